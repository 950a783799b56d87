// The kit's tiny SD1.5 as the pipeline tests load it: ONNX Runtime's CPU EP with one intra-op thread (CI
// has two cores and runs one test file at a time).
import { silentLogger } from "@latentfarm/shared";
import { SdModel } from "../models/sd-model.js";
import { LoadedPipeline } from "../pipeline/loaded-pipeline.js";
import { TINY_SD15 } from "./kit.js";

export function loadTinyModel(path: string = TINY_SD15, name = "tiny-sd15"): Promise<SdModel> {
  return SdModel.load({ name, format: "diffusers-onnx", path }, { ep: { name: "cpu" }, logger: silentLogger, intraOpNumThreads: 1 });
}

/** A pipeline around loadTinyModel() that batches up to 16 UNet rows; its close() closes the model too. */
export async function loadTinyPipeline(): Promise<LoadedPipeline> {
  return new LoadedPipeline(await loadTinyModel(), { maxBatchRows: 16 });
}
