// A1111's API request bodies (/sdapi/v1/txt2img, img2img, extra-single-image) read into the farm's
// GenerationParams. The proto already names its fields as A1111's API does, so most of a body is
// decoded as protobuf JSON; what differs is mapped here, as A1111's api.py and processing.py read it:
// - the sampler is `sampler_name or sampler_index` (default "Euler"), so the API's default sampler is
//   Euler, not the farm's;
// - override_settings is a dict of A1111 options: the ones the farm carries as request fields
//   (sd_model_checkpoint, CLIP_stop_at_last_layers, randn_source, …) move there, the rest are
//   OverrideSettings fields by the same names, and options that do not change an image are left out;
// - images are base64, with or without a data URL's prefix; URLs are not fetched;
// - null means "A1111's default", as pydantic's Optional does; unknown fields are ignored, as pydantic's
//   models ignore them, but a script (script_name, alwayson_scripts) or another input the farm cannot
//   honour is refused rather than silently dropped, since the image would not be the one asked for.
import { fromJson, type JsonObject, type JsonValue } from "@bufbuild/protobuf";
import {
  EXTRAS_MODEL,
  FarmError,
  GenerationParamsSchema,
  OverrideSettingsSchema,
  RngSource,
  type GenerationParams,
  type ModelInfo,
} from "@latentfarm/shared";

export type Endpoint = "txt2img" | "img2img" | "extra-single-image" | "extra-batch-images";

export interface ApiRequest {
  params: GenerationParams;
  /** send_images: whether the response carries the images (A1111's default true). */
  sendImages: boolean;
  /** A1111 fields and options in the body that change nothing on this farm, left out (for the log). */
  ignored: string[];
}

/** Options that are request fields on the farm (and in A1111's own API, where both exist, the field wins). */
const OPTIONS_AS_FIELDS: Readonly<Record<string, string>> = {
  CLIP_stop_at_last_layers: "clip_skip",
  eta_noise_seed_delta: "eta_noise_seed_delta",
  s_churn: "s_churn",
  s_tmin: "s_tmin",
  s_tmax: "s_tmax",
  s_noise: "s_noise",
  s_min_uncond: "s_min_uncond",
  code_former_weight: "code_former_weight",
  face_restoration: "restore_faces",
  initial_noise_multiplier: "initial_noise_multiplier",
};

const RNG_SOURCES: Readonly<Record<string, RngSource>> = { GPU: RngSource.GPU, CPU: RngSource.CPU, NV: RngSource.NV };

/** Body fields of A1111's API that do not change the images (saving, echoing, task ids, UI state). */
const INERT_FIELDS = new Set([
  "sampler_index",
  "send_images",
  "save_images",
  "do_not_save_samples",
  "do_not_save_grid",
  "override_settings_restore_afterwards",
  "comments",
  "force_task_id",
  "include_init_images",
  "script_args",
  "firstphase_width",
  "firstphase_height",
  "image_cfg_scale",
  "show_extras_results",
  "upscale_first",
]);

/**
 * Fields whose effect the farm does not have, and when a value asks for it: refused then (as ignoring
 * them would change the image), never listed as ignored.
 */
const UNSUPPORTED: Readonly<Record<string, { asks: (v: JsonValue) => boolean; why: (v: JsonValue) => string }>> = {
  script_name: {
    asks: (v) => typeof v === "string" && v !== "",
    why: (v) => `scripts are not run on this farm (asked for "${String(v)}")`,
  },
  alwayson_scripts: {
    asks: (v) => v !== null && (typeof v !== "object" || Object.keys(v).length > 0),
    why: () => "always-on scripts (ControlNet and other extensions) are not run on this farm",
  },
  disable_extra_networks: { asks: (v) => v === true, why: () => "not supported: remove the <lora:…> tags from the prompt instead" },
  latent_mask: { asks: (v) => v !== null && v !== "", why: () => "not supported on this farm" },
  firstpass_image: { asks: (v) => v !== null && v !== "", why: () => "not supported on this farm" },
};

function refuseUnsupported(body: JsonObject): void {
  for (const [field, { asks, why }] of Object.entries(UNSUPPORTED)) {
    const v = body[field];
    if (v !== undefined && asks(v)) throw FarmError.invalid(field, why(v));
  }
}

/** The bytes of an API image: base64, or a data URL of it. URLs are not fetched (A1111 fetches them only when allowed). */
export function imageBase64(v: JsonValue, field: string): string {
  if (typeof v !== "string" || v === "") throw FarmError.invalid(field, "must be a base64-encoded image");
  if (/^https?:\/\//i.test(v)) throw FarmError.invalid(field, "image URLs are not fetched: send the image as base64");
  const comma = v.startsWith("data:") ? v.indexOf(",") : -1;
  const data = comma >= 0 ? v.slice(comma + 1) : v;
  if (!/^[A-Za-z0-9+/=_\-\s]*$/.test(data)) throw FarmError.invalid(field, "is not base64");
  return data.replace(/\s+/g, "");
}

/**
 * A model named as A1111 names a checkpoint (sd_model_checkpoint: its title "file.safetensors [hash]",
 * its file name, or its name): the farm's model of that name, with or without the extension, or of that
 * hash. A name no agent offers is passed on as it is, for Submit to refuse with the models it knows.
 */
export function modelFromCheckpointTitle(title: string, models: readonly ModelInfo[]): string {
  const m = /^(.*?)\s*\[([0-9a-fA-F]{8,64})\]$/.exec(title.trim());
  const name = (m?.[1] ?? title).trim();
  const hash = m?.[2]?.toLowerCase();
  const stem = name.replace(/\.(safetensors|ckpt|pt|bin)$/i, "");
  const byName = models.find((x) => x.name === name) ?? models.find((x) => x.name === stem);
  if (byName) return byName.name;
  const byHash = hash && models.find((x) => x.modelHash !== "" && (x.modelHash.startsWith(hash) || hash.startsWith(x.modelHash)));
  return byHash ? byHash.name : stem;
}

function isObject(v: JsonValue | undefined): v is JsonObject {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

const PARAM_FIELDS = new Set(GenerationParamsSchema.fields.map((f) => f.name));
const SETTING_FIELDS = new Set(OverrideSettingsSchema.fields.map((f) => f.name));

/** Reads an A1111 API body into the farm's parameters, or throws INVALID_ARGUMENT naming the field. */
export function readApiRequest(endpoint: Endpoint, raw: unknown, models: readonly ModelInfo[]): ApiRequest {
  if (!isObject(raw as JsonValue)) throw FarmError.invalid("body", "must be a JSON object");
  const body = raw as JsonObject;
  refuseUnsupported(body);
  const ignored: string[] = [];
  const out: JsonObject = {};
  const sendImages = body["send_images"] !== false;
  if (endpoint === "extra-single-image" || endpoint === "extra-batch-images") {
    return { params: extrasParams(endpoint, body, ignored), sendImages, ignored };
  }

  for (const [key, value] of Object.entries(body)) {
    if (value === null || INERT_FIELDS.has(key) || key === "override_settings") continue;
    if (key === "init_images" || key === "mask") continue;
    if (PARAM_FIELDS.has(key) && key !== "extras") out[key] = value;
    else if (!(key in UNSUPPORTED)) ignored.push(key);
  }
  // sampler = sampler_name or sampler_index: the API's default sampler is Euler.
  const samplerName = body["sampler_name"];
  if (typeof samplerName !== "string" || samplerName === "") {
    const index = body["sampler_index"];
    out["sampler_name"] = typeof index === "string" && index !== "" ? index : "Euler";
  }
  if (endpoint === "img2img") {
    const images = body["init_images"];
    if (!Array.isArray(images) || images.length === 0) throw FarmError.invalid("init_images", "img2img needs at least one init image");
    out["init_images"] = images.map((v, i) => imageBase64(v, `init_images[${i}]`));
    const mask = body["mask"];
    if (mask !== undefined && mask !== null && mask !== "") out["mask"] = imageBase64(mask, "mask");
    // A1111 sends inpainting_mask_invert as 0 or 1.
    const invert = body["inpainting_mask_invert"];
    if (typeof invert === "number") out["inpainting_mask_invert"] = invert !== 0;
  } else {
    for (const field of ["init_images", "mask"]) if (body[field] !== undefined && body[field] !== null) ignored.push(field);
    // txt2img's denoising_strength only matters with Hires.fix (and A1111's default differs there).
    if (body["enable_hr"] !== true) delete out["denoising_strength"];
  }
  const settings = body["override_settings"];
  if (settings !== undefined && settings !== null) {
    if (!isObject(settings)) throw FarmError.invalid("override_settings", "must be an object of A1111 option names and values");
    out["override_settings"] = overrideSettings(settings, out, body, models, ignored);
  }
  return { params: decode(out), sendImages, ignored };
}

/** override_settings: options carried as request fields move there (a field in the body wins), the rest stay settings. */
function overrideSettings(
  settings: JsonObject,
  out: JsonObject,
  body: JsonObject,
  models: readonly ModelInfo[],
  ignored: string[],
): JsonObject {
  const kept: JsonObject = {};
  for (const [key, value] of Object.entries(settings)) {
    if (value === null) continue;
    const field = OPTIONS_AS_FIELDS[key];
    if (key === "sd_model_checkpoint") {
      if (typeof value !== "string")
        throw FarmError.invalid("override_settings.sd_model_checkpoint", "must be a checkpoint's title or name");
      if (body["model"] === undefined) out["model"] = modelFromCheckpointTitle(value, models);
    } else if (key === "randn_source") {
      const source = typeof value === "string" ? RNG_SOURCES[value] : undefined;
      if (source === undefined)
        throw FarmError.invalid("override_settings.randn_source", `must be "GPU", "CPU" or "NV", got ${JSON.stringify(value)}`);
      if (body["rng"] === undefined) out["rng"] = source;
    } else if (key === "show_progress_every_n_steps") {
      // Live previews for /progress's current_image: A1111's -1 is every step, 0 none.
      if (typeof value !== "number" || !Number.isInteger(value) || value < -1) {
        throw FarmError.invalid(
          "override_settings.show_progress_every_n_steps",
          `must be a whole number ≥ -1, got ${JSON.stringify(value)}`,
        );
      }
      if (body["preview_every_n_steps"] === undefined) out["preview_every_n_steps"] = value === -1 ? 1 : value;
    } else if (field !== undefined) {
      if (body[field] === undefined || body[field] === null) out[field] = value;
    } else if (SETTING_FIELDS.has(key)) kept[key] = value;
    else ignored.push(`override_settings.${key}`);
  }
  return kept;
}

/**
 * /sdapi/v1/extra-single-image (`image`) and extra-batch-images (`imageList` of {data, name}): the
 * images and A1111's ExtrasBaseRequest fields. A batch is one job of an image each, in list order.
 */
function extrasParams(endpoint: Endpoint, body: JsonObject, ignored: string[]): GenerationParams {
  const extras: JsonObject = {};
  const extrasFields = new Set(GenerationParamsSchema.fields.find((f) => f.name === "extras")!.message!.fields.map((f) => f.name));
  for (const [key, value] of Object.entries(body)) {
    if (value === null || key === "image" || key === "imageList" || INERT_FIELDS.has(key)) continue;
    if (extrasFields.has(key)) extras[key] = value;
    else ignored.push(key);
  }
  // upscaler_1's default is None in A1111's model: nothing to run.
  extras["upscaler_1"] ??= "None";
  let images: string[];
  if (endpoint === "extra-single-image") images = [imageBase64(body["image"] ?? null, "image")];
  else {
    const list = body["imageList"];
    if (!Array.isArray(list) || list.length === 0) throw FarmError.invalid("imageList", "needs at least one {data, name} image");
    images = list.map((item, i) => imageBase64(isObject(item) ? (item["data"] ?? null) : null, `imageList[${i}].data`));
  }
  return decode({ model: EXTRAS_MODEL, init_images: images, extras });
}

/** protobuf JSON decoding, its errors named by the field they are about. */
function decode(json: JsonObject): GenerationParams {
  try {
    return fromJson(GenerationParamsSchema, json);
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    // protobuf-es: "cannot decode field latentfarm.v1.GenerationParams.steps from JSON: …"
    const m = /latentfarm\.v1\.(GenerationParams|OverrideSettings|ExtrasParams)\.(\w+)/.exec(message);
    const field = m === null ? "body" : m[1] === "OverrideSettings" ? `override_settings.${m[2]}` : m[2]!;
    throw FarmError.invalid(field, message.replace(/^cannot decode (field|message) [\w.]+ from JSON: /, "cannot read "));
  }
}
