// The gateway's HTTP edge on its own: routes that need no coordinator call (progress, CORS preflights,
// refusals before a Submit). The coordinator address is a closed loopback port; the calls that reach it
// are covered end to end in tests/e2e/farm.test.ts.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { silentLogger } from "@latentfarm/shared";
import { A1111Gateway } from "./gateway.js";

/** A loopback port nothing listens on: every gRPC call to it fails UNAVAILABLE. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address() as { port: number };
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

async function gateway(opts: { corsAllowOrigins?: string[]; maxBodyBytes?: number } = {}): Promise<A1111Gateway> {
  return A1111Gateway.start({ coordinator: `127.0.0.1:${await closedPort()}`, port: 0, logger: silentLogger, metricsPort: 0, ...opts });
}

test("CORS as A1111's --cors-allow-origins: allowed origins are echoed and preflights answered; others get nothing", async () => {
  const g = await gateway({ corsAllowOrigins: ["http://localhost:3456"] });
  try {
    const allowed = await fetch(`${g.url}/sdapi/v1/progress`, { headers: { origin: "http://localhost:3456" } });
    assert.equal(allowed.status, 200);
    assert.equal(allowed.headers.get("access-control-allow-origin"), "http://localhost:3456");
    assert.equal(allowed.headers.get("access-control-allow-credentials"), "true");
    const other = await fetch(`${g.url}/sdapi/v1/progress`, { headers: { origin: "http://evil.example" } });
    assert.equal(other.status, 200);
    assert.equal(other.headers.get("access-control-allow-origin"), null);
    const preflight = await fetch(`${g.url}/sdapi/v1/txt2img`, {
      method: "OPTIONS",
      headers: {
        origin: "http://localhost:3456",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
      },
    });
    assert.equal(preflight.status, 200);
    assert.match(preflight.headers.get("access-control-allow-methods") ?? "", /POST/);
    assert.equal(preflight.headers.get("access-control-allow-headers"), "content-type");
    const refused = await fetch(`${g.url}/sdapi/v1/txt2img`, {
      method: "OPTIONS",
      headers: { origin: "http://evil.example", "access-control-request-method": "POST" },
    });
    assert.equal(refused.status, 400);
  } finally {
    await g.close();
  }
  // Without the option no origin is allowed, and "*" allows any.
  const none = await gateway();
  const any = await gateway({ corsAllowOrigins: ["*"] });
  try {
    const headers = { origin: "http://localhost:3456" };
    assert.equal((await fetch(`${none.url}/sdapi/v1/progress`, { headers })).headers.get("access-control-allow-origin"), null);
    assert.equal(
      (await fetch(`${any.url}/sdapi/v1/progress`, { headers })).headers.get("access-control-allow-origin"),
      "http://localhost:3456",
    );
  } finally {
    await none.close();
    await any.close();
  }
});

test("refusals before any Submit: bad JSON and bad fields are 422 naming them, a body over the limit 413, unknown routes 404; an unreachable coordinator is 503", async () => {
  const g = await gateway({ maxBodyBytes: 1024 });
  const post = (path: string, body: string) =>
    fetch(`${g.url}/sdapi/v1/${path}`, { method: "POST", headers: { "content-type": "application/json" }, body });
  try {
    const json = await post("txt2img", "{not json");
    assert.equal(json.status, 422);
    assert.equal(((await json.json()) as { detail: Array<{ type: string }> }).detail[0]!.type, "value_error.jsondecode");
    const field = await post("txt2img", JSON.stringify({ cfg_scale: "high" }));
    assert.equal(field.status, 422);
    assert.deepEqual(((await field.json()) as { detail: Array<{ loc: string[] }> }).detail[0]!.loc, ["body", "cfg_scale"]);
    const big = await post("img2img", JSON.stringify({ init_images: ["A".repeat(4096)] }));
    assert.equal(big.status, 413);
    assert.equal((await fetch(`${g.url}/sdapi/v1/no-such-route`)).status, 404);
    assert.equal((await fetch(`${g.url}/`)).status, 404);
    // A body that is fine reaches Submit, which cannot connect.
    const down = await post("txt2img", JSON.stringify({ prompt: "x" }));
    assert.equal(down.status, 503, await down.clone().text());
    // The calls are counted by route and status, unknown paths as "other".
    const metrics = await (await fetch(g.metricsUrl!)).text();
    assert.match(metrics, /^latentfarm_a1111_api_requests_total\{route="txt2img",status="422"\} 2$/m);
    assert.match(metrics, /^latentfarm_a1111_api_requests_total\{route="img2img",status="413"\} 1$/m);
    assert.match(metrics, /^latentfarm_a1111_api_requests_total\{route="other",status="404"\} 2$/m);
    assert.match(metrics, /^latentfarm_a1111_api_calls_in_flight 0$/m);
  } finally {
    await g.close();
  }
});

test("what tools probe before they call: empty script and extension lists, no-op checkpoint reloads, ping; none needs the coordinator", async () => {
  const g = await gateway();
  try {
    const get = async (path: string): Promise<unknown> => {
      const res = await fetch(`${g.url}${path}`);
      assert.equal(res.status, 200, path);
      return res.json();
    };
    assert.deepEqual(await get("/sdapi/v1/scripts"), { txt2img: [], img2img: [] });
    for (const path of ["script-info", "extensions", "hypernetworks", "sd-modules"])
      assert.deepEqual(await get(`/sdapi/v1/${path}`), [], path);
    assert.deepEqual(await get("/internal/ping"), {});
    // Options answer without the coordinator too; the default checkpoint is then unknown.
    assert.deepEqual(await get("/sdapi/v1/options"), { sd_model_checkpoint: null });
    for (const path of ["refresh-loras", "refresh-checkpoints", "refresh-vae", "unload-checkpoint", "reload-checkpoint"]) {
      const res = await fetch(`${g.url}/sdapi/v1/${path}`, { method: "POST" });
      assert.equal(res.status, 200, path);
      assert.equal(await res.json(), null, path);
    }
    // A listing that needs the coordinator is 503 with it unreachable, not an empty list.
    assert.equal((await fetch(`${g.url}/sdapi/v1/loras`)).status, 503);
  } finally {
    await g.close();
  }
});
