/**
 * Whether a job's name for a file an agent resolves in one of its folders (a checkpoint, an upscaler) is
 * a plain name: no path separators or NUL, not hidden or relative (a leading dot), at most `maxLength`.
 * The agent's lookup stays inside its folder either way; this refuses such a name at Submit.
 */
export function isPlainName(name: string, maxLength = 200): boolean {
  return name.length <= maxLength && !/[/\\\0]/.test(name) && !name.startsWith(".");
}

/**
 * Whether a LoRA name (a `<lora:name:…>` tag's, or a request's `loras` entry) can name a file inside the
 * agent's LoRA folder: not empty, no path separators, `..` or control characters. Submit refuses other
 * names; the agent refuses them too, before it looks anything up.
 */
export function isLoraName(name: string): boolean {
  // eslint-disable-next-line no-control-regex
  return name !== "" && !/[/\\\u0000-\u001f]/.test(name) && !name.includes("..");
}
