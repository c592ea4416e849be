// Chunk -> embed -> retrieve -> ask, every call through the retrying fetch.
//   OLLAMA_HOST=http://proxy:11435 OLLAMA_API_KEY=sk-... node rag.mjs
import { Ollama } from "ollama";
import { chunkText, retryingFetch } from "shared-ollama-client";

const MODEL = process.env.MODEL ?? "llama3.2";
const EMBED_MODEL = process.env.EMBED_MODEL ?? "nomic-embed-text";
const DOCUMENT = `The lighthouse at Cape Verity was built in 1874 from granite quarried on the island itself. Its lamp was
first fuelled by whale oil, then by kerosene, and since 1931 by electricity.

The keeper's logbook records every ship that passed in sight. In the storm of 1903 the keeper rowed out
twice to the schooner Margaret and brought back eleven sailors. The lifeboat used that night hangs in the
museum on the harbour front.

Visitors can climb the 212 steps to the gallery from April to October. The light is still active and is
maintained by the coastal authority; the keeper's cottage is now a guest house with four rooms.`;
const QUESTION = "How many steps lead to the gallery?";

const ollama = new Ollama({
  host: process.env.OLLAMA_HOST ?? "http://127.0.0.1:11435",
  headers: { Authorization: `Bearer ${process.env.OLLAMA_API_KEY ?? "ollama"}` },
  fetch: retryingFetch(),
});

/** @param {number[]} a @param {number[]} b */
const cosine = (a, b) => {
  let dot = 0, na = 0, nb = 0;
  a.forEach((x, i) => { dot += x * b[i]; na += x * x; nb += b[i] * b[i]; });
  return dot / (Math.sqrt(na) * Math.sqrt(nb) || 1);
};

// Sized by an estimate that over-counts; pass the model's tokenizer as countTokens for exact sizes.
const chunks = chunkText(DOCUMENT, { maxTokens: 48, overlap: 8 });
// Batches of 2, two calls at a time, results in order.
const batches = [];
for (let i = 0; i < chunks.length; i += 2) batches.push(chunks.slice(i, i + 2));
const vectors = [];
for (let i = 0; i < batches.length; i += 2) {
  const results = await Promise.all(batches.slice(i, i + 2).map((input) => ollama.embed({ model: EMBED_MODEL, input })));
  for (const result of results) vectors.push(...result.embeddings);
}
console.log(`embedded ${chunks.length} chunks`);
const [question] = (await ollama.embed({ model: EMBED_MODEL, input: QUESTION })).embeddings;
const ranked = chunks.map((_, i) => i).sort((i, j) => cosine(question, vectors[j]) - cosine(question, vectors[i]));
const context = ranked.slice(0, 2).map((i) => chunks[i]).join("\n\n");
console.log(`retrieved: ${JSON.stringify(context.slice(0, 80))}...`);
process.stdout.write("answer: ");
const stream = await ollama.chat({ model: MODEL, stream: true, options: { num_predict: 64 }, messages: [
  { role: "system", content: `Answer from this context only:\n\n${context}` },
  { role: "user", content: QUESTION }] });
for await (const part of stream) process.stdout.write(part.message.content);
console.log();
