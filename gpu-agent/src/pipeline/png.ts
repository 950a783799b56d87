import sharp from "sharp";

// CRC-32 (IEEE), as PNG chunks require.
const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(buf: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < buf.length; i++) c = CRC_TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

export function pngChunk(type: string, data: Buffer): Buffer {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(data.length, 0);
  head.write(type, 4, "latin1");
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(Buffer.concat([head.subarray(4), data])), 0);
  return Buffer.concat([head, data, crc]);
}

const isLatin1 = (s: string): boolean => [...s].every((c) => c.codePointAt(0)! <= 0xff);

/**
 * A PNG text chunk the way Pillow writes A1111's infotext: tEXt when the text is Latin-1,
 * otherwise uncompressed iTXt with UTF-8.
 */
export function textChunk(keyword: string, text: string): Buffer {
  if (isLatin1(text))
    return pngChunk("tEXt", Buffer.concat([Buffer.from(keyword, "latin1"), Buffer.from([0]), Buffer.from(text, "latin1")]));
  // keyword \0 compression-flag compression-method language \0 translated-keyword \0 text
  return pngChunk("iTXt", Buffer.concat([Buffer.from(keyword, "latin1"), Buffer.from([0, 0, 0, 0, 0]), Buffer.from(text, "utf8")]));
}

/** Inserts text chunks right after IHDR, where readers find them before the image data. */
export function withTextChunks(png: Buffer, texts: Record<string, string>): Buffer {
  const ihdrEnd = 8 + 8 + png.readUInt32BE(8) + 4;
  const chunks = Object.entries(texts).map(([k, v]) => textChunk(k, v));
  return Buffer.concat([png.subarray(0, ihdrEnd), ...chunks, png.subarray(ihdrEnd)]);
}

/** Reads tEXt/iTXt chunks back (used by tests and `latentfarm` tools). */
export function readTextChunks(png: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let p = 8;
  while (p + 8 <= png.length) {
    const len = png.readUInt32BE(p);
    const type = png.toString("latin1", p + 4, p + 8);
    const data = png.subarray(p + 8, p + 8 + len);
    if (type === "tEXt") {
      const z = data.indexOf(0);
      out[data.toString("latin1", 0, z)] = data.toString("latin1", z + 1);
    } else if (type === "iTXt") {
      const z = data.indexOf(0);
      const key = data.toString("latin1", 0, z);
      let q = z + 3;
      q = data.indexOf(0, q) + 1; // language tag
      q = data.indexOf(0, q) + 1; // translated keyword
      out[key] = data.toString("utf8", q);
    }
    if (type === "IEND") break;
    p += 12 + len;
  }
  return out;
}

/**
 * VAE output [1,3,H,W] in [-1,1] → 8-bit RGB, truncating as A1111 does
 * (clamp((x+1)/2, 0, 1)·255, then astype(uint8)).
 */
export function toRgb8(image: Float32Array, width: number, height: number): Uint8Array {
  const plane = width * height;
  const out = new Uint8Array(plane * 3);
  for (let c = 0; c < 3; c++) {
    for (let i = 0; i < plane; i++) {
      // A1111 computes this in float32; Math.fround keeps the truncation boundary identical.
      const v = Math.min(Math.max(Math.fround(Math.fround(image[c * plane + i]! + 1) / 2), 0), 1);
      out[i * 3 + c] = Math.trunc(Math.fround(v * 255));
    }
  }
  return out;
}

export async function encodePng(rgb: Uint8Array, width: number, height: number, infotext: string): Promise<Buffer> {
  const png = await sharp(rgb, { raw: { width, height, channels: 3 } })
    .png({ compressionLevel: 6 })
    .toBuffer();
  return withTextChunks(png, { parameters: infotext });
}
