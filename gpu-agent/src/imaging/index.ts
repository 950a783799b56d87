// Public API of the imaging package: pure numerics for img2img, Hires.fix, tiling and face restoration.

export {
  interpolate,
  latentUpscaleMode,
  antialiasAxisWeights,
  torchAreaPixelScale,
  LATENT_UPSCALE_MODES,
  DEFAULT_LATENT_UPSCALER,
  type InterpolationMode,
  type LatentUpscaleMode,
  type InterpolateOptions,
  type InterpolateResult,
  type Nchw,
} from "./interpolate.js";

export {
  setupImg2imgSteps,
  kdiffusionImg2imgSchedule,
  timestepImg2imgSchedule,
  a1111Timesteps,
  type Img2imgStepInput,
  type Img2imgStepPlan,
  type BuildSigmas,
  type KdiffusionImg2imgSchedule,
  type TimestepImg2imgSchedule,
} from "./denoise-steps.js";

export {
  hiresTarget,
  hiresPassPlan,
  hiresInfotextFields,
  hiresSchedulerName,
  cropLatent,
  LATENT_FACTOR,
  type HiresSizeInput,
  type HiresTarget,
  type HiresPassInput,
  type HiresPassPlan,
  type HiresInfotextInput,
  type InfotextValue,
} from "./hires.js";

export {
  planImg2imgResize,
  composeOnCanvas,
  sharpOperations,
  planPixelUpscale,
  planUpscaleBy,
  upscaleTarget,
  resizeModeName,
  RESIZE_MODES,
  type ResizeModeName,
  type Img2imgResizePlan,
  type FillBand,
  type SharpOperation,
  type UpscaleStep,
  type Image8,
  type Size,
  type Rect,
} from "./resize-modes.js";

export { upscaleWithTensorTiles, tensorTileStarts, type UpscaleTensor, type TensorTilesOptions } from "./tensor-tiling.js";

export {
  upscaleWithModel,
  splitGrid,
  combineGrid,
  cropPadded,
  overlapAlpha,
  tileToBgrTensor,
  bgrTensorToTile,
  ESRGAN_TILE,
  ESRGAN_TILE_OVERLAP,
  type TileGrid,
  type GridRow,
  type TileInfo,
  type UpscaleTile,
  type UpscaleWithModelOptions,
} from "./esrgan-tiling.js";

export {
  planTiles,
  tileOverheadPercent,
  tileWeights,
  featherRamp,
  tileSeed,
  extractTile,
  runTiledPass,
  TileBlender,
  type TileLayout,
  type TileLayoutOptions,
  type TileRect,
  type TileSeedRule,
} from "./tiled-pass.js";

export {
  estimateSimilarity,
  invertAffine,
  applyAffine,
  decomposeSimilarity,
  alignmentMatrix,
  alignFace,
  warpAffine,
  faceToTensor,
  tensorToFace,
  parseMask,
  boxFeatherMask,
  gaussianBlur,
  pasteFaces,
  FFHQ_TEMPLATE_512,
  FACE_SIZE,
  ALIGN_BORDER_RGB,
  type Point,
  type Affine,
  type FloatImage,
  type AlignedFace,
  type RestoredFace,
} from "./face-align.js";

export {
  decodeImage,
  inspectImage,
  sniffImageFormat,
  ImageInputError,
  DEFAULT_IMAGE_LIMITS,
  type ImageFormat,
  type ImageLimits,
  type ImageInfo,
  type ImageInputProblem,
  type DecodeOptions,
  type DecodedImage,
} from "./image-input.js";
