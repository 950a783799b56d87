import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import sharp from "sharp";
import { create } from "@bufbuild/protobuf";
import { RngSource, RunTaskRequestSchema } from "@latentfarm/shared";
import type { LoadedPipeline } from "./loaded-pipeline.js";
import { renderTask } from "./txt2img.js";
import { residentArraysOut } from "../sampling/kernels.js";
import { KIT_FIXTURES, kitSkip } from "../test-support/kit.js";
import { loadTinyPipeline } from "../test-support/tiny-pipeline.js";

const FIXTURES = KIT_FIXTURES;
const REF = join(FIXTURES, "reference", "txt2img");
const skip = kitSkip("tiny-sd15");

interface Case {
  id: string;
  prompt: string;
  negative_prompt: string;
  seed: number;
  sampler_name: string;
  scheduler?: string;
  steps: number;
  cfg_scale: number;
  width: number;
  height: number;
  batch_size?: number;
  clip_skip?: number;
  rng: "CPU" | "GPU" | "NV";
  expected: string[];
  latents: Array<{ file: string; shape: number[] }>;
}

const RNG = { CPU: RngSource.CPU, GPU: RngSource.GPU, NV: RngSource.NV };

describe("txt2img pipeline against A1111 reference renders", { skip, concurrency: false }, () => {
  let pipe: LoadedPipeline;
  before(async () => {
    pipe = await loadTinyPipeline();
  });
  after(async () => pipe?.close());

  const cases = skip ? [] : (JSON.parse(readFileSync(join(REF, "cases.json"), "utf8")) as Case[]);
  for (const c of cases) {
    test(`${c.id}: every image within ±2 levels of A1111's PNG`, async () => {
      for (let i = 0; i < (c.batch_size ?? 1); i++) {
        const req = create(RunTaskRequestSchema, {
          taskId: `${c.id}-${i}`,
          jobId: c.id,
          imageIndex: i,
          seed: BigInt(c.seed + i),
          subseed: 0n,
          params: {
            prompt: c.prompt,
            negativePrompt: c.negative_prompt,
            samplerName: c.sampler_name,
            scheduler: c.scheduler ?? "",
            steps: c.steps,
            cfgScale: c.cfg_scale,
            width: c.width,
            height: c.height,
            clipSkip: c.clip_skip ?? 1,
            rng: RNG[c.rng],
            model: "tiny-sd15",
          },
        });
        const steps: number[] = [];
        const img = await renderTask(pipe, req, {
          signal: new AbortController().signal,
          agentId: "test",
          onStep: (s) => steps.push(s),
          onWarning: () => {},
        });
        const a = await sharp(img.png).removeAlpha().raw().toBuffer();
        const b = await sharp(join(REF, c.expected[i]!)).removeAlpha().raw().toBuffer();
        let max = 0;
        for (let k = 0; k < a.length; k++) max = Math.max(max, Math.abs(a[k]! - b[k]!));
        assert.ok(max <= 2, `${c.expected[i]}: max difference ${max} levels`);
        assert.deepEqual(
          steps,
          Array.from({ length: c.steps }, (_, k) => k + 1),
          "one progress event per sampling step",
        );
        assert.match(img.infotext, new RegExp(`Seed: ${c.seed + i}, Size: ${c.width}x${c.height}`));
      }
    });
  }

  const base = {
    prompt: "a castle",
    samplerName: "Euler a",
    steps: 6,
    cfgScale: 7,
    width: 64,
    height: 64,
    rng: RngSource.NV,
    model: "tiny-sd15",
  };
  const renderWith = async (seed: number, subseed: number, params: Record<string, unknown> = {}): Promise<Buffer> => {
    const img = await renderTask(
      pipe,
      create(RunTaskRequestSchema, {
        taskId: "v",
        jobId: "v",
        seed: BigInt(seed),
        subseed: BigInt(subseed),
        params: { ...base, ...params },
      }),
      { signal: new AbortController().signal, agentId: "t", onStep: () => {}, onWarning: () => {} },
    );
    return sharp(img.png).raw().toBuffer();
  };

  const renderImage = (seed: bigint, params: Record<string, unknown>) =>
    renderTask(pipe, create(RunTaskRequestSchema, { taskId: "r", jobId: "r", seed, params: { ...base, ...params } }), {
      signal: new AbortController().signal,
      agentId: "t",
      onStep: () => {},
      onWarning: () => {},
    });

  test("variation seed at strength 0 equals the plain seed, at strength 1 the subseed", async () => {
    // A deterministic sampler: the variation seed only changes the initial noise; an ancestral
    // sampler would still draw its later noise from the main seed's generator, as in A1111.
    const det = { samplerName: "DPM++ 2M" };
    const plain = await renderWith(11, 0, det);
    const sub = await renderWith(99, 0, det);
    assert.deepEqual(await renderWith(11, 99, { ...det, subseedStrength: 0 }), plain);
    const one = await renderWith(11, 99, { ...det, subseedStrength: 1 });
    let max = 0;
    for (let k = 0; k < one.length; k++) max = Math.max(max, Math.abs(one[k]! - sub[k]!));
    assert.ok(max <= 1, `strength 1 differs from the subseed's render by ${max} levels`);
    const half = await renderWith(11, 99, { ...det, subseedStrength: 0.5 });
    assert.notDeepEqual(half, plain);
    assert.notDeepEqual(half, sub);
  });

  test("an image's seed alone decides it: a batch of 4 equals 4 single renders", async () => {
    // The coordinator gives image i seed s+i; each task renders with its own generator, so running
    // them concurrently (one shared UNet batch) gives the single renders.
    const singles = [];
    for (let i = 0; i < 4; i++) singles.push(await renderWith(500 + i, 0));
    const batch = await Promise.all([0, 1, 2, 3].map((i) => renderWith(500 + i, 0)));
    for (let i = 0; i < 4; i++) {
      let max = 0;
      for (let k = 0; k < singles[i]!.length; k++) max = Math.max(max, Math.abs(singles[i]![k]! - batch[i]![k]!));
      assert.ok(max <= 1, `image ${i} differs by ${max} levels`);
    }
  });

  test("ENSD changes Euler a's ancestral noise and is written to the infotext; DPM++ 2M ignores it", async () => {
    const a = await renderWith(7, 0, { etaNoiseSeedDelta: 31337n });
    assert.notDeepEqual(a, await renderWith(7, 0));
    const img = await renderTask(
      pipe,
      create(RunTaskRequestSchema, { taskId: "e", jobId: "e", seed: 7n, params: { ...base, etaNoiseSeedDelta: 31337n } }),
      { signal: new AbortController().signal, agentId: "t", onStep: () => {}, onWarning: () => {} },
    );
    assert.match(img.infotext, /ENSD: 31337/);
    const dpm = { samplerName: "DPM++ 2M" };
    assert.deepEqual(await renderWith(7, 0, { ...dpm, etaNoiseSeedDelta: 31337n }), await renderWith(7, 0, dpm));
  });

  test("emphasis and use_old_scheduling settings reach the prompt's encoding and write A1111's infotext entries", async () => {
    const render = (params: Record<string, unknown>) => renderImage(4n, params);
    const weighted = { prompt: "a (red:1.4) cube" };
    const original = await render(weighted);
    const noNorm = await render({ ...weighted, overrideSettings: { emphasis: "No norm" } });
    assert.notDeepEqual(noNorm.png, original.png);
    assert.match(noNorm.infotext, /Emphasis: No norm/);
    assert.doesNotMatch(original.infotext, /Emphasis/);
    // No bracket in any text encoded: the mode changes nothing and is not written.
    const plainNoNorm = await render({ prompt: "a red cube", overrideSettings: { emphasis: "No norm" } });
    assert.doesNotMatch(plainNoNorm.infotext, /Emphasis/);
    assert.deepEqual(plainNoNorm.png, (await render({ prompt: "a red cube" })).png);
    // "1.5" is step 1 in the old reading and past the end (6 of 4 steps) in the new one.
    const edited = { prompt: "a [red:blue:1.5] cube", steps: 4 };
    const oldTimelines = await render({ ...edited, overrideSettings: { useOldScheduling: true } });
    assert.match(oldTimelines.infotext, /Old prompt editing timelines: True/);
    assert.notDeepEqual(oldTimelines.png, (await render(edited)).png);
    // The same setting with a schedule both readings agree on: same image, nothing written.
    const same = await render({ ...edited, prompt: "a [red:blue:2] cube", overrideSettings: { useOldScheduling: true } });
    assert.doesNotMatch(same.infotext, /Old prompt editing/);
    assert.deepEqual(same.png, (await render({ ...edited, prompt: "a [red:blue:2] cube" })).png);
  });

  test("pad_cond_uncond(_v0) pad the shorter prompt, run both in one UNet batch, and write A1111's entry last", async () => {
    const render = (params: Record<string, unknown>) => renderImage(9n, params);
    const unetRuns = async (params: Record<string, unknown>) => {
      const before = pipe.model.ortRunStats("unet").runs;
      const img = await render(params);
      return { img, runs: pipe.model.ortRunStats("unet").runs - before };
    };
    // 90 tokens: two chunks against the negative prompt's one.
    const long = { prompt: Array.from({ length: 90 }, () => "castle").join(" "), negativePrompt: "blurry", samplerName: "Euler" };
    const plain = await unetRuns(long);
    assert.equal(plain.runs, 2 * base.steps, "without padding, prompt and negative prompt run apart");
    assert.doesNotMatch(plain.img.infotext, /Pad conds/);

    const padded = await unetRuns({ ...long, overrideSettings: { padCondUncond: true } });
    assert.equal(padded.runs, base.steps, "padded, they share one batch");
    assert.notDeepEqual(padded.img.png, plain.img.png);
    assert.match(padded.img.infotext, /, Pad conds: True, Version: /);

    const v0 = await unetRuns({ ...long, overrideSettings: { padCondUncondV0: true } });
    assert.equal(v0.runs, base.steps);
    assert.notDeepEqual(v0.img.png, plain.img.png);
    assert.notDeepEqual(v0.img.png, padded.img.png);
    assert.match(v0.img.infotext, /, Pad conds v0: True, Version: /);
    // v0 wins when both are set, as in A1111.
    const both = await render({ ...long, overrideSettings: { padCondUncond: true, padCondUncondV0: true } });
    assert.deepEqual(both.png, v0.img.png);
    assert.doesNotMatch(both.infotext, /Pad conds: True/);

    // v0 cuts a longer negative prompt to the prompt's chunk.
    const cut = await unetRuns({ prompt: "castle", negativePrompt: long.prompt, overrideSettings: { padCondUncondV0: true } });
    assert.equal(cut.runs, base.steps);
    assert.match(cut.img.infotext, /Pad conds v0: True/);
    // Prompts of one length: nothing to pad, the image and infotext as without the options.
    const even = await render({ overrideSettings: { padCondUncond: true } });
    assert.equal(even.infotext, (await render({})).infotext);
  });

  test("use_downcasted_alpha_bar reaches DDIM, PLMS, UniPC and LCM: a different image, and A1111's entry", async () => {
    for (const samplerName of ["DDIM", "PLMS", "UniPC", "LCM"]) {
      const current = await renderImage(12n, { samplerName });
      const old = await renderImage(12n, { samplerName, overrideSettings: { useDowncastedAlphaBar: true } });
      assert.notDeepEqual(old.png, current.png, samplerName);
      assert.match(old.infotext, /Downcast alphas_cumprod: True/);
    }
  });

  test("preview_every_n_steps: every n-th step's progress carries a latent-sized PNG of the denoised latent", async () => {
    const previewsOf = async (params: Record<string, unknown>) => {
      const previews = new Map<number, Uint8Array>();
      const steps: number[] = [];
      const img = await renderTask(
        pipe,
        create(RunTaskRequestSchema, { taskId: "v", jobId: "v", seed: 2n, params: { ...base, ...params } }),
        {
          signal: new AbortController().signal,
          agentId: "t",
          onStep: (step, _total, png) => {
            steps.push(step);
            if (png) previews.set(step, png);
          },
          onWarning: () => {},
        },
      );
      return { img, previews, steps };
    };
    for (const samplerName of ["Euler a", "Heun", "DDIM"]) {
      const { img, previews, steps } = await previewsOf({ samplerName, previewEveryNSteps: 2 });
      assert.deepEqual(steps, [1, 2, 3, 4, 5, 6], samplerName);
      assert.deepEqual([...previews.keys()], [2, 4, 6], samplerName);
      const last = await sharp(previews.get(6)!).raw().toBuffer({ resolveWithObject: true });
      assert.deepEqual([last.info.width, last.info.height, last.info.channels], [8, 8, 3]);
      // Each preview shows its own step's prediction.
      const early = await sharp(previews.get(2)!).raw().toBuffer();
      assert.notDeepEqual(early, last.data, samplerName);
      // Previews change nothing in the image.
      assert.deepEqual(img.png, (await renderImage(2n, { samplerName })).png, samplerName);
    }
    const none = await previewsOf({});
    assert.equal(none.previews.size, 0);
    // live_preview_content: the prompt's own prediction (A1111's default), the negative prompt's, or CFG's.
    const shown = async (content: string | undefined, samplerName = "Euler") =>
      (
        await previewsOf({ samplerName, previewEveryNSteps: 3, ...(content && { overrideSettings: { livePreviewContent: content } }) })
      ).previews.get(3);
    for (const samplerName of ["Euler", "DDIM"]) {
      const [byDefault, prompt, negative, combined] = await Promise.all(
        [undefined, "Prompt", "Negative prompt", "Combined"].map((c) => shown(c, samplerName)),
      );
      assert.deepEqual(byDefault, prompt, samplerName);
      assert.notDeepEqual(prompt, negative, samplerName);
      assert.notDeepEqual(prompt, combined, samplerName);
      assert.notDeepEqual(negative, combined, samplerName);
    }
  });

  test("a legacy combined name gives the same image and infotext as sampler + schedule type", async () => {
    const legacy = await renderWith(3, 0, { samplerName: "DPM++ 2M Karras" });
    assert.deepEqual(legacy, await renderWith(3, 0, { samplerName: "DPM++ 2M", scheduler: "Karras" }));
    assert.deepEqual(legacy, await renderWith(3, 0, { samplerName: "DPM++ 2M" }));
  });

  test("cancellation stops a render at the next model call, and the run gives its latents back", async () => {
    const ac = new AbortController();
    const out = residentArraysOut();
    let steps = 0;
    await assert.rejects(
      renderTask(pipe, create(RunTaskRequestSchema, { taskId: "c", jobId: "c", seed: 1n, params: { ...base, steps: 100 } }), {
        signal: ac.signal,
        agentId: "t",
        onStep: (s) => {
          steps = s;
          if (s === 3) ac.abort();
        },
        onWarning: () => {},
      }),
      (err: unknown) => (err as { codeName?: string }).codeName === "CANCELLED",
    );
    assert.equal(steps, 3, "no step after the abort");
    assert.equal(residentArraysOut(), out, "the cancelled run's resident latents are free again");
  });
});
