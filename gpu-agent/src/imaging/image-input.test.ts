import { test } from "node:test";
import assert from "node:assert/strict";
import zlib from "node:zlib";
import sharp from "sharp";
import { decodeImage, ImageInputError, inspectImage, sniffImageFormat, type ImageLimits } from "./image-input.js";

const LIMITS: ImageLimits = { maxBytes: 4 * 1024 * 1024, maxPixels: 4096 * 4096 };

function pngChunk(type: string, data: Buffer): Buffer {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, "ascii"), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(zlib.crc32(body));
  return Buffer.concat([len, body, crc]);
}

/** A valid 1-bit grayscale PNG of one colour: W×H pixels in a few tens of KB (decoded RGB: W·H·3 bytes). */
function bombPng(width: number, height: number): Buffer {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 1; // bit depth
  ihdr[9] = 0; // grayscale
  const rows = Buffer.alloc(height * (1 + Math.ceil(width / 8))); // filter byte 0 + zero bits per row
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    pngChunk("IHDR", ihdr),
    pngChunk("IDAT", zlib.deflateSync(rows, { level: 9 })),
    pngChunk("IEND", Buffer.alloc(0)),
  ]);
}

async function rejects(p: Promise<unknown>, problem: string, field = "init_images[0]"): Promise<ImageInputError> {
  try {
    await p;
  } catch (err) {
    assert.ok(err instanceof ImageInputError, `expected ImageInputError, got ${String(err)}`);
    assert.equal(err.code, "INVALID_ARGUMENT");
    assert.equal(err.field, field);
    assert.equal(err.problem, problem, err.message);
    return err;
  }
  assert.fail(`expected rejection (${problem})`);
}

test("a 20000×20000 decompression bomb is refused from its header, without allocating it", async () => {
  const bomb = bombPng(20000, 20000);
  assert.ok(bomb.length < 200_000, `bomb is ${bomb.length} bytes`);
  const rss0 = process.memoryUsage().rss;
  const t0 = performance.now();
  const err = await rejects(decodeImage(bomb, LIMITS, "init_images[0]"), "too-many-pixels");
  assert.match(err.message, /pixel limit|20000x20000/);
  await rejects(inspectImage(bomb, LIMITS, "init_images[0]"), "too-many-pixels");
  const grewMb = (process.memoryUsage().rss - rss0) / 1e6;
  assert.ok(grewMb < 200, `RSS grew ${grewMb.toFixed(1)} MB (decoded it would be 1200 MB)`);
  assert.ok(performance.now() - t0 < 2000, "rejected quickly");
  // Still a valid image: with room for it, the header reads fine.
  const info = await inspectImage(bomb, { maxBytes: LIMITS.maxBytes, maxPixels: 20000 * 20000 });
  assert.deepEqual([info.format, info.width, info.height], ["png", 20000, 20000]);
});

test("byte limit, empty input, unknown and disallowed formats", async () => {
  const png = await sharp({ create: { width: 16, height: 16, channels: 3, background: { r: 1, g: 2, b: 3 } } })
    .png()
    .toBuffer();
  await rejects(decodeImage(png, { maxBytes: png.length - 1, maxPixels: 1e6 }, "init_images[0]"), "too-many-bytes");
  await rejects(decodeImage(new Uint8Array(0), LIMITS, "init_images[0]"), "empty");
  await rejects(decodeImage(Buffer.from("GIF89a............"), LIMITS, "init_images[0]"), "unsupported-format");
  await rejects(
    decodeImage(Buffer.from('<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>'), LIMITS, "init_images[0]"),
    "unsupported-format",
  );
  await rejects(decodeImage(png, { ...LIMITS, formats: ["jpeg"] }, "init_images[0]"), "unsupported-format");
  await rejects(decodeImage(png, { maxBytes: 1e6, maxPixels: 255 }, "mask"), "too-many-pixels", "mask");
});

test("corrupt and truncated data is INVALID_ARGUMENT, and the decoder keeps serving", async () => {
  const png = await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 9, g: 9, b: 9 } } })
    .composite([{ input: Buffer.alloc(32 * 32 * 3, 200), raw: { width: 32, height: 32, channels: 3 }, left: 7, top: 5 }])
    .png({ compressionLevel: 0 })
    .toBuffer();
  const garbage = Buffer.concat([png.subarray(0, 8), Buffer.from("definitely not chunks")]);
  await rejects(decodeImage(garbage, LIMITS, "init_images[0]"), "undecodable");
  await rejects(decodeImage(png.subarray(0, Math.floor(png.length / 2)), LIMITS, "init_images[0]"), "undecodable");
  const jpeg = await sharp(png).jpeg().toBuffer();
  await rejects(decodeImage(jpeg.subarray(0, 40), LIMITS, "init_images[0]"), "undecodable");
  const ok = await decodeImage(png, LIMITS);
  assert.deepEqual([ok.width, ok.height, ok.channels], [64, 64, 3]);
});

test("PNG, JPEG and WebP decode to RGB; RGBA is flattened onto white with PIL's rounding", async () => {
  // one pixel (200, 100, 0) at alpha 128 over white: DIV255(255·127 + c·128) = 227, 177, 127
  const rgba = Buffer.from([200, 100, 0, 128, 10, 20, 30, 255, 0, 0, 0, 0, 50, 60, 70, 1]);
  const png = await sharp(rgba, { raw: { width: 2, height: 2, channels: 4 } })
    .png()
    .toBuffer();
  const d = await decodeImage(png, LIMITS);
  assert.deepEqual(d.info.format, "png");
  assert.deepEqual(Array.from(d.data), [227, 177, 127, 10, 20, 30, 255, 255, 255, 254, 254, 254]);
  const black = await decodeImage(png, LIMITS, "image", { background: [0, 0, 0] });
  assert.deepEqual(Array.from(black.data.subarray(0, 3)), [100, 50, 0]);

  const webp = await sharp(rgba, { raw: { width: 2, height: 2, channels: 4 } })
    .webp({ lossless: true })
    .toBuffer();
  assert.equal(sniffImageFormat(webp), "webp");
  assert.deepEqual(Array.from((await decodeImage(webp, LIMITS)).data), Array.from(d.data));

  const jpeg = await sharp({ create: { width: 40, height: 24, channels: 3, background: { r: 128, g: 128, b: 128 } } })
    .jpeg({ quality: 95 })
    .toBuffer();
  const j = await decodeImage(jpeg, LIMITS);
  assert.deepEqual([j.info.format, j.width, j.height, j.data.length], ["jpeg", 40, 24, 40 * 24 * 3]);
  assert.ok(Math.abs(j.data[0]! - 128) <= 1, `jpeg gray ${j.data[0]}`);

  // gray + alpha is PIL mode "LA": converted to RGB without compositing
  const la = await sharp(Buffer.from([90, 0, 90, 255]), { raw: { width: 2, height: 1, channels: 2 } })
    .toColourspace("b-w")
    .png()
    .toBuffer();
  assert.equal(la[25], 4, "PNG colour type 4 (gray + alpha)");
  assert.deepEqual(Array.from((await decodeImage(la, LIMITS)).data), [90, 90, 90, 90, 90, 90]);
});
