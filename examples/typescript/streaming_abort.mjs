// Leaving a stream early: abort() closes the connection, the only cancel signal Ollama has; the proxy
// passes it on, so the replica stops generating and its slot is free for the next request.
//   OLLAMA_HOST=http://proxy:11435 OLLAMA_API_KEY=sk-... node streaming_abort.mjs
import { Ollama } from "ollama";
import { retryingFetch } from "shared-ollama-client";

const ollama = new Ollama({
  host: process.env.OLLAMA_HOST ?? "http://127.0.0.1:11435",
  headers: { Authorization: `Bearer ${process.env.OLLAMA_API_KEY ?? "ollama"}` },
  fetch: retryingFetch(),
});

const stream = await ollama.chat({ model: process.env.MODEL ?? "llama3.2", stream: true,
  messages: [{ role: "user", content: "Tell me a very long story about the sea." }] });
let received = "";
try {
  for await (const part of stream) {
    received += part.message.content;
    if (received.length >= 40) {
      stream.abort(); // or `break`: leaving the loop also closes the stream
      break;
    }
  }
} catch (error) {
  if (/** @type {Error} */ (error).name !== "AbortError") throw error;
}
console.log(`aborted the stream after ${received.length} characters: ${JSON.stringify(received)}`);
