import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import sharp from "sharp";
import { InfotextFileError, readInfotextFile } from "./infotext-file.js";

const INFOTEXT = "a cat, 日本の城 (masterpiece:1.2)\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 7, Size: 64x64";

/**
 * EXIF as piexif dumps A1111's {"Exif": {UserComment: ...}}: a big-endian TIFF header, IFD0 holding only
 * the Exif IFD pointer, and that IFD holding UserComment (type UNDEFINED) with its bytes after it.
 */
function piexifUserComment(comment: Buffer): Buffer {
  const ifd0 = 8;
  const exifIfd = ifd0 + 2 + 12 + 4;
  const data = exifIfd + 2 + 12 + 4;
  const out = Buffer.alloc(data + comment.length);
  out.write("MM\0*", 0, "latin1");
  out.writeUInt32BE(ifd0, 4);
  out.writeUInt16BE(1, ifd0);
  out.writeUInt16BE(0x8769, ifd0 + 2); // ExifIFD pointer, LONG × 1
  out.writeUInt16BE(4, ifd0 + 4);
  out.writeUInt32BE(1, ifd0 + 6);
  out.writeUInt32BE(exifIfd, ifd0 + 10);
  out.writeUInt16BE(1, exifIfd);
  out.writeUInt16BE(0x9286, exifIfd + 2); // UserComment, UNDEFINED × n
  out.writeUInt16BE(7, exifIfd + 4);
  out.writeUInt32BE(comment.length, exifIfd + 6);
  out.writeUInt32BE(data, exifIfd + 10);
  comment.copy(out, data);
  return out;
}

/** A JPEG with `tiff` in an APP1 Exif segment right after SOI, where PIL puts what it is given. */
async function jpegWithExif(tiff: Buffer): Promise<Buffer> {
  const jpeg = await sharp({ create: { width: 8, height: 8, channels: 3, background: "red" } })
    .jpeg()
    .toBuffer();
  const app1 = Buffer.alloc(4 + 6);
  app1.writeUInt16BE(0xffe1, 0);
  app1.writeUInt16BE(2 + 6 + tiff.length, 2);
  app1.write("Exif\0\0", 4, "latin1");
  return Buffer.concat([jpeg.subarray(0, 2), app1, tiff, jpeg.subarray(2)]);
}

const utf16be = (text: string): Buffer => Buffer.from(text, "utf16le").swap16();

function withFiles(run: (write: (name: string, bytes: Buffer | string) => string) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), "infotext-file-"));
  const write = (name: string, bytes: Buffer | string): string => {
    writeFileSync(join(dir, name), bytes);
    return join(dir, name);
  };
  return run(write).finally(() => rmSync(dir, { recursive: true, force: true }));
}

test("A1111's JPEG: the EXIF UserComment piexif wrote (UNICODE, UTF-16BE), non-Latin text included", () =>
  withFiles(async (write) => {
    const comment = Buffer.concat([Buffer.from("UNICODE\0", "latin1"), utf16be(INFOTEXT)]);
    assert.equal(await readInfotextFile(write("a.jpg", await jpegWithExif(piexifUserComment(comment)))), INFOTEXT);
    // A writer that put a little-endian byte-order mark first.
    const le = Buffer.concat([Buffer.from("UNICODE\0", "latin1"), Buffer.from([0xff, 0xfe]), Buffer.from(INFOTEXT, "utf16le")]);
    assert.equal(await readInfotextFile(write("le.jpg", await jpegWithExif(piexifUserComment(le)))), INFOTEXT);
  }));

test("WebP, JPEG and AVIF with an ASCII UserComment (what libvips writes), a PNG's parameters chunk, a text file", () =>
  withFiles(async (write) => {
    const ascii = "a castle\nSteps: 4, Sampler: Euler, Seed: 3, Size: 8x8";
    for (const format of ["webp", "jpeg", "avif"] as const) {
      const image = await sharp({ create: { width: 8, height: 8, channels: 3, background: "blue" } })
        .withExif({ IFD2: { UserComment: ascii } })
        .toFormat(format)
        .toBuffer();
      assert.equal(await readInfotextFile(write(`b.${format}`, image)), ascii, format);
    }
    assert.equal(await readInfotextFile(write("c.txt", INFOTEXT)), INFOTEXT);
  }));

test("an image without generation data, an unreadable image or a missing file: InfotextFileError saying which", () =>
  withFiles(async (write) => {
    const plain = await sharp({ create: { width: 8, height: 8, channels: 3, background: "green" } })
      .jpeg()
      .toBuffer();
    await assert.rejects(
      readInfotextFile(write("d.jpg", plain)),
      (e: unknown) => e instanceof InfotextFileError && /no "parameters" text or EXIF UserComment/.test(e.message),
    );
    const broken = Buffer.concat([plain.subarray(0, 3), Buffer.alloc(40)]);
    await assert.rejects(
      readInfotextFile(write("e.jpg", broken)),
      (e: unknown) => e instanceof InfotextFileError && /not an image sharp can read/.test(e.message),
    );
    await assert.rejects(readInfotextFile("/nonexistent/f.png"), InfotextFileError);
  }));
