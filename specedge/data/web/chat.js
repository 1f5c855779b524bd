// The device's chat page: streams an answer from /v1/chat/completions and shows, beside it, how
// it was made (the `specedge` numbers of its last chunk). Model text only ever goes in as text.
"use strict";
const $ = (id) => document.getElementById(id);
const log = $("log"), prompt = $("prompt"), key = $("key");
let messages = [], busy = null;

key.value = sessionStorage.getItem("specedge-key") || "";
key.addEventListener("change", () => { sessionStorage.setItem("specedge-key", key.value); loadModel(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if (key.value) h["Authorization"] = "Bearer " + key.value;
  return h;
}

function add(cls, text) {
  const div = document.createElement("div");
  div.className = "turn " + cls;
  div.textContent = text;
  log.appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function apiError(res) {
  try { return (await res.json()).error.message; } catch { return res.status + " " + res.statusText; }
}

async function loadModel() {
  const res = await fetch("/v1/models", { headers: headers() });
  if (!res.ok) { $("model").textContent = await apiError(res); return; }
  const card = (await res.json()).data[0];
  $("model").textContent = `device's draft: ${card.draft || "?"} · cloud target: ${card.target || "not heard yet"}`;
}

const num = (x, digits) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

// How the answer was made, from the `specedge` object of the last chunk (openai_api.spec_summary).
function how(s) {
  const div = document.createElement("div");
  div.className = "how";
  const streamed = s.streamed_share || 0;
  const mode = s.rounds === 0 ? "streamed by the cloud" :
    streamed > 0 ? `speculated, ${Math.round(100 * streamed)} % streamed` : "speculated";
  const parts = [
    ["how", mode],
    ["rounds", s.rounds],
    ["accepted per round", num(s.mean_accepted_len, 2)],
    ["acceptance", s.rounds ? Math.round(100 * s.acceptance_rate) + " %" : "–"],
    ["tokens/s", num(s.tokens_per_s, 1)],
    ["first token", num(s.ttft_s, 2) + " s"],
    ["bytes/token", num(s.wire_bytes_per_token, 0)],
    ["J/token", num(s.energy_j_per_token, 3)],
  ];
  for (const [name, value] of parts) {
    const b = document.createElement("b");
    b.textContent = value;
    div.append(name + " ", b, " · ");
  }
  const exact = document.createElement("span");
  exact.className = s.exact ? "exact" : "numerical";
  exact.textContent = s.exact ? "exact: the target's own tokens" : "not bitwise exact (see the device's status)";
  div.append(exact);
  return div;
}

async function ask(text) {
  messages.push({ role: "user", content: text });
  add("user", text);
  const out = add("assistant", "");
  const body = { model: "specedge", messages, stream: true, stream_options: { include_usage: true },
                 max_tokens: Number($("max_tokens").value), temperature: Number($("temperature").value) };
  busy = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  let answer = "", summary = null;
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                     body: JSON.stringify(body), signal: busy.signal });
    if (!res.ok) throw new Error(await apiError(res));
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += value;
      const events = pending.split("\n\n");
      pending = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          answer += delta.content;
          if (chunk.specedge && chunk.specedge.unverified) {
            const span = document.createElement("span");
            span.className = "unverified";
            span.title = "tokens the target never saw (the cloud could not be reached)";
            span.textContent = delta.content;
            out.appendChild(span);
          } else {
            out.append(delta.content);
          }
        }
        if (chunk.specedge && "rounds" in chunk.specedge) summary = chunk.specedge;
      }
    }
    messages.push({ role: "assistant", content: answer });
    if (summary) out.appendChild(how(summary));
    loadModel();  // the card names the target version that answered
  } catch (err) {
    messages.pop();  // the question goes again with the next one only if it was answered
    const e = document.createElement("div");
    e.className = "error";
    e.textContent = err.name === "AbortError" ? "stopped" : String(err.message || err);
    out.appendChild(e);
  } finally {
    busy = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = prompt.value.trim();
  if (!text || busy) return;
  prompt.value = "";
  ask(text);
});
prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => busy && busy.abort());
$("clear").addEventListener("click", () => { messages = []; log.textContent = ""; });
loadModel();
