/** The middle value of `xs` (the upper of the two middle ones for an even count); `xs` is not reordered. */
export function median(xs: readonly number[]): number {
  return [...xs].sort((a, b) => a - b)[xs.length >> 1]!;
}
