// The tiled second pass's pure pixel code lives in @latentfarm/shared, because the coordinator plans
// the tiles and crops their inputs with it; re-exported here so the agent's imports stay as they were.
export {
  planTiles,
  tileOverheadPercent,
  tileWeights,
  featherRamp,
  tileSeed,
  extractTile,
  runTiledPass,
  layoutFromStarts,
  cropNchw,
  TileBlender,
  type TileLayout,
  type TileLayoutOptions,
  type TileRect,
  type TileSeedRule,
} from "@latentfarm/shared";
