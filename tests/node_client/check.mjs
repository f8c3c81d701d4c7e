// The official `openai` Node client (npm, 6.49.0) against a real llava-server on the tiny fixture:
// one streamed chat with an image and one `responses.create`, each giving HF's greedy text
// (tests/fixtures/refs/tiny.json, case `chat_template`).
// Usage: node tests/node_client/check.mjs path/to/llava-server   (after `npm ci` in this folder)
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { createServer } from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import OpenAI from "openai";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const fixtures = path.join(root, "tests", "fixtures");
const MODEL = "tiny-llava";

const freePort = () =>
  new Promise((resolve) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });

const refs = JSON.parse(readFileSync(path.join(fixtures, "refs", "tiny.json"), "utf8"));
const want = refs.cases.find((c) => c.name === "chat_template").greedy.text;
const image = readFileSync(path.join(fixtures, "images", "scene_640x480.png")).toString("base64");
const dataUri = `data:image/png;base64,${image}`;

const port = await freePort();
const server = spawn(
  process.argv[2],
  ["serve", "--model", path.join(fixtures, "tiny"), "--served-model-name", MODEL, "--port", String(port),
   "--num-kv-blocks", "400"],
  { env: { ...process.env, RUST_LOG: "warn" }, stdio: "inherit" },
);
let passed = 0;
let failed = 0;
const check = async (name, body) => {
  try {
    await body();
    passed += 1;
    console.log(`ok ${name}`);
  } catch (e) {
    failed += 1;
    console.log(`FAILED ${name}: ${e.stack || e}`);
  }
};
const assertEqual = (got, expected, what) => {
  if (got !== expected) throw new Error(`${what}: got ${JSON.stringify(got)}, want ${JSON.stringify(expected)}`);
};

try {
  const deadline = Date.now() + 60_000;
  for (;;) {
    try {
      if ((await fetch(`http://127.0.0.1:${port}/health`)).status === 200) break;
    } catch {}
    if (Date.now() > deadline) throw new Error("server did not become healthy");
    await new Promise((r) => setTimeout(r, 100));
  }
  const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused", maxRetries: 0 });

  await check("streamed chat with an image", async () => {
    const stream = await client.chat.completions.create({
      model: MODEL, temperature: 0, max_tokens: 16, stream: true, stream_options: { include_usage: true },
      messages: [{ role: "user", content: [
        { type: "image_url", image_url: { url: dataUri } },
        { type: "text", text: "What is in the picture?" },
      ] }],
    });
    let text = "";
    let usage = null;
    for await (const chunk of stream) {
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices) text += c.delta.content ?? "";
    }
    assertEqual(text, want, "text");
    assertEqual(usage?.completion_tokens, 16, "completion tokens");
    assertEqual(usage?.prompt_tokens, 594, "prompt tokens");
  });

  await check("responses.create with an image", async () => {
    const r = await client.responses.create({
      model: MODEL, temperature: 0, max_output_tokens: 16,
      input: [{ role: "user", content: [
        { type: "input_image", image_url: dataUri },
        { type: "input_text", text: "What is in the picture?" },
      ] }],
    });
    assertEqual(r.output_text, want, "output_text");
    assertEqual(r.usage.output_tokens, 16, "output tokens");
  });
} finally {
  server.kill("SIGTERM");
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
