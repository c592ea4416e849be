// Test support: attempts recorded below the retrying fetch, and the wait each refusal asked for.
import assert from "node:assert/strict";

export function recorder() {
  /** @type {{ sent: number, received: number, status: number | null, headers: Headers | null }[]} */
  const attempts = [];
  /** @type {typeof fetch} */
  const fetchImpl = async (input, init) => {
    const sent = performance.now();
    try {
      const response = await fetch(input, init);
      attempts.push({ sent, received: performance.now(), status: response.status, headers: response.headers });
      return response;
    } catch (error) {
      attempts.push({ sent, received: performance.now(), status: null, headers: null });
      throw error;
    }
  };
  return { attempts, fetch: fetchImpl };
}

/** The wait a refusal asked for, read independently of the helper. @param {Headers} headers */
export function toldS(headers) {
  const ms = headers.get("retry-after-ms");
  return ms !== null ? Number(ms) / 1000 : Number(headers.get("retry-after"));
}

/** Every retry started no earlier than the answer before it said, and not absurdly later. */
export function assertWaitedAsTold(attempts) {
  for (let i = 1; i < attempts.length; i++) {
    const gap = (attempts[i].sent - attempts[i - 1].received) / 1000;
    const told = toldS(attempts[i - 1].headers);
    assert.ok(gap >= told - 0.005 && gap <= told * 1.1 + 2, `told ${told} s, waited ${gap} s`);
  }
}
