// Quick start: ollama-js unchanged, with the retrying fetch under it; streaming.
//   OLLAMA_HOST=http://proxy:11435 OLLAMA_API_KEY=sk-... node quickstart.mjs
// ollama-js reads neither variable itself: pass the host and the key (it sends OLLAMA_API_KEY only to
// ollama.com).
import { Ollama } from "ollama";
import { retryingFetch } from "shared-ollama-client";

const ollama = new Ollama({
  host: process.env.OLLAMA_HOST ?? "http://127.0.0.1:11435",
  headers: { Authorization: `Bearer ${process.env.OLLAMA_API_KEY ?? "ollama"}` },
  fetch: retryingFetch(), // 429/503 waited as the service says; at most 5 attempts, 120 s in all
});

process.stdout.write("answer: ");
// Streaming first: headers come with the first token, so Node's 300 s header timeout never applies to
// a long answer, and text is shown as it is produced.
const stream = await ollama.chat({ model: process.env.MODEL ?? "llama3.2", stream: true,
  messages: [{ role: "user", content: "Why is the sky blue?" }] });
for await (const part of stream) {
  process.stdout.write(part.message.content);
  if (part.done) console.log(`\n(${part.prompt_eval_count} prompt tokens, ${part.eval_count} answer tokens)`);
}
