/**
 * Auxiliary ONNX models (upscalers, face detector, face restorers) on a set of ONNX Runtime sessions:
 * each loaded once per path, on the sessions' execution provider. A pipeline's SdModel keeps one beside
 * its UNet and VAE; an Extras host, which loads no Stable Diffusion model, has only this.
 */
import type { OrtSessions } from "../runtime/ort-sessions.js";
import type { SessionInfo, WireTensor } from "../runtime/protocol.js";

export class AuxiliarySessions {
  private readonly loaded = new Map<string, Promise<SessionInfo>>();

  constructor(private readonly sessions: OrtSessions) {}

  loadAuxiliary(path: string, signal?: AbortSignal): Promise<SessionInfo> {
    let info = this.loaded.get(path);
    if (info === undefined) {
      info = this.sessions.load(`aux:${path}`, path, signal);
      this.loaded.set(path, info);
      info.catch(() => this.loaded.delete(path));
    }
    return info;
  }

  close(): Promise<void> {
    return this.sessions.close();
  }

  /** Runs a session loaded with loadAuxiliary; feeds are transferred. */
  async runAuxiliary(
    path: string,
    feeds: Record<string, WireTensor>,
    outputs: string[],
    signal?: AbortSignal,
  ): Promise<Record<string, WireTensor>> {
    await this.loadAuxiliary(path, signal);
    return this.sessions.run(`aux:${path}`, feeds, outputs, signal);
  }
}
