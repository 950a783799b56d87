/**
 * Whether a job's name for a file an agent resolves in one of its folders (a checkpoint, an upscaler) is
 * a plain name: no path separators or NUL, not hidden or relative (a leading dot), at most `maxLength`.
 * The agent's lookup stays inside its folder either way; this refuses such a name at Submit.
 */
export function isPlainName(name: string, maxLength = 200): boolean {
  return name.length <= maxLength && !/[/\\\0]/.test(name) && !name.startsWith(".");
}
