// A1111's generation data as it saves it with an image: a PNG's "parameters" text chunk, or the EXIF
// UserComment of a JPEG, WebP or AVIF (piexif's UNICODE form: an 8-byte charset prefix, then UTF-16BE).
// civitai's downloads are often the JPEG/WebP kind. Anything that is not an image is read as text.
import { readFile } from "node:fs/promises";
import exifReader from "exif-reader";
import sharp from "sharp";

/** Why a file yields no generation data; the CLI reports it as a usage error. */
export class InfotextFileError extends Error {}

/** The image kinds A1111 writes generation data into, by their leading bytes. */
const IMAGE_SIGNATURES: ReadonlyArray<(b: Buffer) => boolean> = [
  (b) => b.subarray(0, 4).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47])), // PNG
  (b) => b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff, // JPEG
  (b) => b.toString("latin1", 0, 4) === "RIFF" && b.toString("latin1", 8, 12) === "WEBP",
  (b) => b.toString("latin1", 4, 8) === "ftyp", // AVIF (ISO base media)
];

export async function readInfotextFile(path: string): Promise<string> {
  const bytes = await readFile(path).catch((err: Error) => {
    throw new InfotextFileError(err.message);
  });
  if (!IMAGE_SIGNATURES.some((isKind) => isKind(bytes))) return bytes.toString("utf8");
  const { text } = await imageGenerationData(bytes, path);
  if (text === undefined || text === "") {
    throw new InfotextFileError(`${path} has no "parameters" text or EXIF UserComment (A1111's generation data)`);
  }
  return text;
}

/**
 * An image's generation data ("parameters" text, else the EXIF UserComment) and its text chunks, as
 * A1111's read_info_from_image finds them. `name` says which image in errors.
 */
export async function imageGenerationData(
  bytes: Buffer,
  name: string,
): Promise<{ text: string | undefined; comments: ReadonlyArray<{ keyword: string; text: string }> }> {
  const meta = await sharp(bytes)
    .metadata()
    .catch((err: Error) => {
      throw new InfotextFileError(`${name} is not an image sharp can read: ${err.message}`);
    });
  const comments = meta.comments ?? [];
  return { text: comments.find((c) => c.keyword === "parameters")?.text ?? userComment(meta.exif), comments };
}

/** EXIF UserComment's text, decoded by its charset prefix as piexif's UserComment.load does. */
function userComment(exif: Buffer | undefined): string | undefined {
  if (exif === undefined) return undefined;
  let comment: unknown;
  try {
    comment = exifReader(exif).Photo?.UserComment;
  } catch (err) {
    throw new InfotextFileError(`its EXIF data does not parse: ${(err as Error).message}`);
  }
  if (!Buffer.isBuffer(comment) || comment.length < 8) return undefined;
  const prefix = comment.toString("latin1", 0, 8);
  const body = comment.subarray(8);
  if (prefix === "UNICODE\0") {
    // piexif writes big-endian; a byte-order mark says otherwise.
    if (body[0] === 0xff && body[1] === 0xfe) return body.subarray(2).toString("utf16le");
    const swapped = Buffer.from(body.subarray(body[0] === 0xfe && body[1] === 0xff ? 2 : 0));
    return swapped
      .subarray(0, swapped.length - (swapped.length % 2))
      .swap16()
      .toString("utf16le");
  }
  if (prefix === "ASCII\0\0\0") return body.toString("latin1");
  if (prefix === "JIS\0\0\0\0\0") throw new InfotextFileError("its UserComment is JIS-encoded, which this reader does not decode");
  // Undefined charset: A1111's reader gives up; taken as UTF-8, which other tools write there.
  return body.toString("utf8");
}
