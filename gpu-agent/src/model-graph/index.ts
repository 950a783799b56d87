// Public API of the model-graph module: checkpoints and LoRAs in, diffusers-layout ONNX folders out.

export { ModelFileError } from "./errors.js";

export {
  SafetensorsFile,
  readSafetensors,
  encodeSafetensors,
  writeSafetensors,
  writeSafetensorsStreaming,
  toFloat32,
  numel,
  isSafetensorsDType,
  MAX_HEADER_BYTES,
} from "./safetensors.js";
export type { SafetensorsDType, Tensor, TensorData, TensorInfo, TensorToWrite, LazyTensorToWrite } from "./safetensors.js";
export { f16ToF32, bf16ToF32, f32ToF16, f32ToF16Bits, f32ToBf16 } from "./half.js";

export { GraphBuilder, encodeModel, saveModel, f, DataType, DEFAULT_EMBED_LIMIT } from "./onnx.js";
export type {
  Attr,
  Dim,
  ElemType,
  ModelSpec,
  SaveOptions,
  SavedModel,
  ExternalLocation,
  InitializerSpec,
  NodeSpec,
  ValueInfoSpec,
} from "./onnx.js";
export { decodeModel, readModel, initializerFloat32 } from "./onnx-read.js";
export { withTokenOverrides, TOKEN_OVERRIDE_POSITIONS, TOKEN_OVERRIDE_VECTORS } from "./token-override.js";
export { withCircularPadding } from "./circular-padding.js";
export { readTorchFile, TorchTensor, type TorchFloatType } from "./torch-file.js";
export type { DecodedModel, DecodedNode, DecodedTensor } from "./onnx-read.js";
export type { LazyBytes } from "./protobuf.js";

export { SafetensorsWeights, MemoryWeights } from "./weights.js";
export type { WeightSource, WeightTransform, WeightType, MemoryTensor } from "./weights.js";
export { Net } from "./nn.js";
export {
  buildUNet,
  detectUNetConfig,
  timestepFrequencies,
  sinusoidalEmbedding,
  textEmbedsDim,
  timeIdsOf,
  UNET_PREFIX,
  TIME_IDS,
  REFINER_TIME_IDS,
  TIME_ID_EMBED_DIM,
} from "./unet.js";
export type { HeadsHint, UNetConfig } from "./unet.js";
export { buildTextEncoder, detectTextEncoderConfig, HF_CLIP_PREFIX, OPEN_CLIP_PREFIX, SD_TEXT_PREFIXES } from "./clip.js";
export type { TextEncoderConfig, TextEncoderHint } from "./clip.js";
export { buildVaeDecoder, buildVaeEncoder, detectVaeConfig } from "./vae.js";
export type { VaeConfig } from "./vae.js";
export { importVae } from "./vae-import.js";
export type { ImportedVae, VaeImportOptions, VaeManifest } from "./vae-import.js";
export { detectArchitecture, SDXL_SCALING_FACTOR } from "./architecture.js";
export type {
  Architecture,
  ArchitectureHints,
  ModelFamily,
  PredictionType,
  SdArchitecture,
  SdxlRefinerArchitecture,
} from "./architecture.js";

export {
  buildPipeline,
  buildPipelineFromCheckpoint,
  importCheckpoint,
  checkpointSha256,
  knownSha256,
  readManifest,
  sha256File,
  a1111ModelHash,
  a1111LegacyModelHash,
  loraAddnetHash,
  loraShortHash,
  COMPONENTS,
  MANIFEST_FILE,
  LINK_NAME,
  BUILDER_VERSION,
} from "./pipeline.js";
export type {
  BuiltPipeline,
  ComponentName,
  ImportOptions,
  ImportedCheckpoint,
  PipelineBuildOptions,
  PipelineManifest,
} from "./pipeline.js";

export {
  makeTinyModel,
  makeTinyModelCli,
  readTinyConfig,
  ldmTensorShapes,
  randomTensor,
  TINY_SPECS,
  FULL_SIZE_SPECS,
} from "./tiny-model.js";
export type { MakeTinyModelOptions, TinyModel, TinySpec, TinyConfigName } from "./tiny-model.js";
export { makeTinyVocab, tinyTokenizerFiles } from "./tiny-tokenizer.js";
export type { TinyVocab } from "./tiny-tokenizer.js";

export {
  loadLora,
  loraTransform,
  loraTargets,
  importCheckpointWithLoras,
  computeDelta,
  deltaShape,
  compvisCandidates,
  moduleIndex,
  readLoraBundleTensors,
  isSafetensorsLora,
  BUNDLED_EMBEDDING_PREFIX,
} from "./lora.js";
export type { LoraApplication, LoraModule, LoraRequest, ParsedLora, ImportedWithLoras } from "./lora.js";

export { SeededRandom } from "./random.js";
