// The play page: one WebSocket to the gateway per tab (control, input, prompt switches, JPEG frames), an optional
// WebRTC video track, the action overlay and the FPS and latency readouts. Image deployments start from an image and
// take keys and the mouse; text-to-video deployments start from a prompt, and LongLive ones switch prompts while the
// video plays and may start by continuing an uploaded clip (its reconstruction plays first, then what follows). The message protocol is described in the gateway's tab.py.

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"), error: $("error"), demos: $("demos"), upload: $("upload"), preview: $("preview"),
  mode: $("mode"), transport: $("transport"), seed: $("seed"), record: $("record"), start: $("start"),
  stop: $("stop"), download: $("download"), game: $("game"), canvas: $("canvas"), video: $("video"),
  heldKeys: $("held-keys"), heldMouse: $("held-mouse"), echoKeys: $("echo-keys"), echoMouse: $("echo-mouse"),
  fps: $("fps"), latency: $("latency"), frameCount: $("frame-count"), blockIndex: $("block-index"),
  keysHelp: $("keys-help"), sessionInfo: $("session-info"), overlay: $("overlay"), setupHelp: $("setup-help"),
  promptSetup: $("prompt-setup"), prompt: $("prompt"), imageSetup: $("image-setup"), switchForm: $("switch"),
  switchPrompt: $("switch-prompt"), switchButton: $("switch-button"), switchStatus: $("switch-status"),
  clipSetup: $("clip-setup"), clip: $("clip"), clipPrompt: $("clip-prompt"), clipFrames: $("clip-frames"),
};
const FRAME_HEADER_BYTES = 16; // uint32 seq, uint32 block, float64 sent-at ms (little endian)
const INPUT_TICK_MS = 40; // mouse motion is sent at most this often
const RTP_CLOCK = 90000;

let config = null; // GET /api/config
let deployment = null; // {family, text, prompt_switching, ...} once a session (here or in another tab) showed it
let ws = null;
let session = null; // the running session's state, null when idle
let upload = null; // {name, file} once a valid upload is chosen
let clip = null; // {name, file} once a valid clip to continue is chosen
let clockOffset = 0; // gateway clock minus this page's clock (ms), from the best ping
let bestRtt = Infinity;

// Public for the browser test and the latency benchmark: counters and per-frame samples.
// clip: {total, painted} frames of a clip's reconstruction; phases: "clip", "block" as painting moved between them.
const stats = { frames: 0, samples: [], blocks: 0, bytes: 0, ended: null, errors: [], switches: [], clip: null,
                phases: [] };
window.worldstream = { stats, get session() { return session; } };

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
  stats.errors.push(message);
}
function clearError() { ui.error.hidden = true; ui.error.textContent = ""; }
function setStatus(text) { ui.status.textContent = text; }
const nowMs = () => performance.timeOrigin + performance.now();

// ---- connection --------------------------------------------------------------------------------------------

function connect() {
  return new Promise((resolve, reject) => {
    const url = new URL("/ws", location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => { ws = socket; syncClock(); resolve(socket); };
    socket.onerror = () => reject(new Error("cannot reach the gateway's WebSocket"));
    socket.onmessage = (event) => typeof event.data === "string" ? onMessage(JSON.parse(event.data))
                                                                 : onFrame(event.data);
    socket.onclose = (event) => {
      if (ws === socket) ws = null;
      if (event.code === 1009) {
        showError(`The gateway closed the connection: a message was larger than its limit ` +
                  `(images up to ${mib(config.limits.max_image_bytes)}, clips up to ` +
                  `${mib(config.limits.max_video_bytes)}).`);
      } else if (session) {
        showError(`Lost the connection to the gateway (code ${event.code}); the session ended.`);
      }
      if (session) endSession(null);
      setStatus("Disconnected from the gateway; Start reconnects.");
    };
  });
}

function send(message) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
}

function syncClock() {
  for (let i = 0; i < 5; i++) setTimeout(() => send({ type: "ping", t: nowMs() }), i * 150);
}

function mib(bytes) { return `${(bytes / 1048576).toFixed(bytes % 1048576 ? 1 : 0)} MiB`; }

// ---- messages from the gateway -----------------------------------------------------------------------------

function onMessage(message) {
  switch (message.type) {
    case "pong": {
      const now = nowMs(), rtt = now - message.t;
      if (rtt < bestRtt) { bestRtt = rtt; clockOffset = message.server - (message.t + now) / 2; }
      break;
    }
    case "info": onInfo(message); break;
    case "answer": session?.pc?.setRemoteDescription({ type: "answer", sdp: message.sdp })
      .catch((e) => showError(`WebRTC: ${e.message}`)); break;
    case "frames": onFrames(message); break;
    case "block": onBlock(message); break;
    case "clip": onClip(message); break;
    case "sent": session?.sent.set(message.seq, message.t); break;
    case "end": onEnd(message); break;
    case "switched": onSwitched(message); break;
    case "error":
      showError(message.message);
      if (message.fatal && session) {
        if (!session.info) showDeployment(null); // the start was refused: maybe the deployment changed
        endSession(null);
      }
      break;
  }
}

// The start form of the deployment: the prompt (text-to-video) or the image, both while it is unknown.
function showDeployment(known) {
  deployment = known;
  ui.promptSetup.hidden = known !== null && !known.text;
  ui.imageSetup.hidden = known !== null && known.text;
  ui.setupHelp.hidden = known !== null;
  ui.clipSetup.hidden = known !== null && !known.video_conditioning;
}

function onInfo(info) {
  if (!session) return;
  session.info = info;
  showDeployment({ family: info.family, text: info.text, prompt_switching: info.prompt_switching,
                   video_conditioning: info.video_conditioning });
  ui.mode.textContent = `${info.mode} (${info.family}, served by this deployment)`;
  const scale = Math.max(1, Math.floor(Math.min(720 / info.width, 400 / info.height)));
  for (const element of [ui.canvas, ui.video]) {
    element.width = info.width; element.height = info.height;
    element.style.width = `${info.width * scale}px`; element.style.height = `${info.height * scale}px`;
  }
  ui.canvas.hidden = info.transport === "webrtc";
  ui.video.hidden = info.transport !== "webrtc";
  ui.sessionInfo.textContent = `${info.width}×${info.height} at ${info.fps} fps, up to ${info.max_blocks} blocks, ` +
    `${info.transport === "webrtc" ? "WebRTC video" : "JPEG over WebSocket"}; session ${info.session_id.slice(0, 8)}.`;
  ui.overlay.hidden = info.text;
  ui.switchForm.hidden = !info.prompt_switching;
  if (info.text) onTextInfo(info); else onImageInfo(info);
}

function onTextInfo(info) {
  const dropped = info.prompt_tokens_dropped
    ? ` The model reads 512 tokens: the last ${info.prompt_tokens_dropped} of the prompt were dropped.` : "";
  ui.keysHelp.textContent = `Text-to-video: the prompt drives the video; there are no keys to hold.${dropped}`;
  ui.switchButton.disabled = false;
  setStatus(info.prompt_switching ? `Playing ${info.mode}: type a new prompt to switch while it plays.`
                                  : `Playing ${info.mode}.`);
  (info.prompt_switching ? ui.switchPrompt : ui.game).focus();
}

function onImageInfo(info) {
  // Key caps in a readable order: the mode's keys in vector order (W S A D), then camera keys, then release keys.
  const rank = (b) => b.name ? info.key_names.indexOf(b.name) : b.mouse.some((v) => v !== 0) ? 100 : 200;
  session.keys = [...info.bindings].sort((a, b) => rank(a) - rank(b) || a.key.localeCompare(b.key)).map((b) => b.key);
  renderCaps(ui.heldKeys, session.keys, []);
  renderCaps(ui.echoKeys, session.keys, []);
  const describe = (b) => b.name ? `${b.key} ${b.name}` : b.mouse.some((v) => v !== 0)
    ? `${b.key} look ${lookName(b.mouse)}` : `${b.key} release`;
  const order = new Map(session.keys.map((key, i) => [key, i]));
  const bindings = [...info.bindings].sort((a, b) => order.get(a.key) - order.get(b.key));
  const mouse = info.mouse_dim ? ` Click the view to steer with the mouse (Esc releases it).` : "";
  ui.keysHelp.textContent = `Focus the game view and hold keys: ${bindings.map(describe).join(", ")}.` +
    `${mouse} Tab leaves the game view.`;
  setStatus(`Playing ${info.mode}: focus the game view and hold keys.`);
  ui.game.focus();
}

function lookName([pitch, yaw]) {
  return pitch > 0 ? "up" : pitch < 0 ? "down" : yaw < 0 ? "left" : "right";
}

// A block's last frames, with its action echo; its first frames came ahead of it ("frames").
function onBlock(block) {
  if (!session) return;
  session.blocks.set(block.index, block);
  stats.blocks += 1;
  onFrames(block);
}

function onFrames(frames) {
  if (!session) return;
  session.blockBySeq.push(frames);
  if (session.blockBySeq.length > 64) {
    const old = session.blockBySeq.shift();
    if (old === session.blocks.get(old.index)) session.blocks.delete(old.index);
  }
}

// Frames of the clip's reconstruction: they play before block 0, counted apart from the generated ones.
function onClip(message) {
  if (!session) return;
  session.blockBySeq.push({ clip: true, first_seq: message.first_seq, frames: message.frames });
  stats.clip ??= { total: message.total_frames, painted: 0 };
  if (message.first_frame === 0) {
    setStatus(`Playing the clip as the model reconstructs it (${message.total_frames} frames); the video that ` +
              "continues it follows.");
  }
}

// The decoder says where a switch took effect before it sends that block; it is shown once the block is on screen.
function onSwitched(message) {
  if (!session) return;
  session.switches.set(message.block, message);
  stats.switches.push(message);
}

function showSwitch(switched) {
  const dropped = switched.tokens_dropped ? ` (its last ${switched.tokens_dropped} tokens dropped)` : "";
  ui.switchStatus.textContent = `prompt switched at block ${switched.block}${dropped}`;
  ui.switchStatus.hidden = false;
  setStatus(`Playing ${session.info.mode} under the new prompt: type another to switch again.`);
}

function blockOf(seq) {
  const list = session.blockBySeq;
  for (let i = list.length - 1; i >= 0; i--) if (list[i].first_seq <= seq) return list[i];
  return null;
}

function onEnd(message) {
  stats.ended = message;
  const recording = message.recording ? " The recording is ready to download." : "";
  setStatus(`Session ended (${message.reason.replaceAll("_", " ")}): ${message.detail}, ` +
            `${message.blocks} blocks.${recording}`);
  endSession(message.recording);
}

// ---- frames ------------------------------------------------------------------------------------------------

function onFrame(buffer) {
  if (!session) return;
  const view = new DataView(buffer);
  const seq = view.getUint32(0, true), sentAt = view.getFloat64(8, true);
  stats.bytes += buffer.byteLength;
  session.sent.set(seq, sentAt);
  const blob = new Blob([new Uint8Array(buffer, FRAME_HEADER_BYTES)], { type: "image/jpeg" });
  const current = session;
  createImageBitmap(blob).then((bitmap) => {
    if (session !== current || seq <= current.drawnSeq) { bitmap.close(); return; }
    current.drawnSeq = seq;
    requestAnimationFrame(() => {
      ui.canvas.getContext("2d").drawImage(bitmap, 0, 0);
      bitmap.close();
      requestAnimationFrame((t) => painted(seq, t)); // the next frame starts once this one is on screen
    });
  }, () => showError(`frame ${seq}: the browser could not decode its JPEG`));
}

function watchVideo(current) {
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
  const onVideoFrame = (now, metadata) => {
    if (session !== current) return;
    const seq = rtpToSeq(current, metadata);
    if (seq !== null) painted(seq, metadata.expectedDisplayTime ?? now);
    ui.video.requestVideoFrameCallback(onVideoFrame);
  };
  ui.video.requestVideoFrameCallback(onVideoFrame);
}

// RTP timestamps are a random offset plus seq * (90000 / fps). The first frame seen is matched to the frame the
// gateway sent last before it arrived; later ones follow from their timestamps.
function rtpToSeq(current, metadata) {
  if (metadata.rtpTimestamp === undefined || !current.info) return null;
  const step = Math.floor(RTP_CLOCK / current.info.fps);
  if (current.anchor === null) {
    const arrived = performance.timeOrigin + (metadata.receiveTime ?? performance.now()) + clockOffset;
    let best = null;
    for (const [seq, at] of current.sent) if (at <= arrived + 2 && (best === null || seq > best)) best = seq;
    if (best === null) return null;
    current.anchor = { seq: best, rtp: metadata.rtpTimestamp };
  }
  const delta = ((metadata.rtpTimestamp - current.anchor.rtp) >>> 0);
  return current.anchor.seq + Math.round((delta > 0x7fffffff ? delta - 0x100000000 : delta) / step);
}

function painted(seq, paintPerf) {
  if (!session) return;
  const block = blockOf(seq);
  stats.frames += 1;
  session.paintTimes.push(paintPerf);
  const phase = block?.clip ? "clip" : "block";
  if (block && stats.phases.at(-1) !== phase) {
    stats.phases.push(phase);
    if (phase === "block" && stats.clip) {
      setStatus(`Playing the continuation of the clip${session.info.prompt_switching
        ? ": type a new prompt to switch while it plays." : "."}`);
    }
  }
  if (block?.clip) {
    stats.clip.painted += 1;
    ui.clipFrames.textContent = `${stats.clip.painted} of ${stats.clip.total}`;
    ui.blockIndex.textContent = "clip";
  } else if (block) {
    const paint = performance.timeOrigin + paintPerf + clockOffset; // gateway clock
    const sample = {
      seq, block: block.index, part: block.first_frame ?? 0, first: seq === block.first_seq && !block.first_frame,
      transport: session.info.transport,
      latency: paint - block.send_time, to_gateway: block.received - block.send_time,
      sent: session.sent.has(seq) ? session.sent.get(seq) - block.received : null,
      to_page: session.sent.has(seq) ? paint - session.sent.get(seq) : null,
    };
    if (stats.samples.length < 20000) stats.samples.push(sample);
    session.latencies.push(sample.latency);
    if (session.latencies.length > 32) session.latencies.shift();
    session.unreported.push(Math.max(0, sample.latency) / 1000);
    if (block.index !== session.shownBlock) {
      session.shownBlock = block.index;
      session.echoShown = false;
      if (session.switches.has(block.index)) showSwitch(session.switches.get(block.index));
      ui.blockIndex.textContent = String(block.index);
    }
    const whole = session.blocks.get(block.index); // the echo comes with the block's last frames
    if (!session.echoShown && whole) {
      session.echoShown = true;
      if (whole.echo) showEcho(whole.echo);
    }
  }
  session.sent.delete(seq - 64);
  ui.frameCount.textContent = String(stats.frames);
}

function showEcho(echo) {
  renderCaps(ui.echoKeys, session.keys, echo.keys);
  ui.echoKeys.dataset.keys = echo.keys.join(" ");
  ui.echoKeys.setAttribute("aria-label", `applied: ${echo.names.join(", ") || "no keys"}`);
  ui.echoMouse.textContent = echo.mouse.length ? `pitch ${echo.mouse[0].toFixed(2)} yaw ${echo.mouse[1].toFixed(2)}` : "";
}

function renderCaps(element, keys, on) {
  element.replaceChildren(...keys.map((key) => {
    const cap = document.createElement("span");
    cap.className = on.includes(key) ? "cap on" : "cap";
    cap.textContent = key;
    return cap;
  }));
}

function updateReadouts() {
  if (!session) return;
  const now = performance.now();
  while (session.paintTimes.length && session.paintTimes[0] < now - 1000) session.paintTimes.shift();
  ui.fps.textContent = String(session.paintTimes.length);
  if (session.latencies.length) {
    const sorted = [...session.latencies].sort((a, b) => a - b);
    ui.latency.textContent = `${Math.round(sorted[sorted.length >> 1])} ms`;
  }
  if (session.unreported.length) {
    send({ type: "stats", paint_latency: session.unreported.splice(0, 256) });
  }
}
setInterval(updateReadouts, 500);

// ---- input -------------------------------------------------------------------------------------------------
// Keys drive the game only while the game view has focus; everything else (Tab, Esc, shortcuts) is left alone.

const held = []; // bound keys held down, in press order
let mouse = [0, 0]; // pointer-lock motion since the last input message
let mouseSent = false; // the last message had motion (so a still mouse must be sent once)

function boundKey(event) {
  if (!session?.keys || event.ctrlKey || event.metaKey || event.altKey) return null;
  const key = event.key.length === 1 ? event.key.toUpperCase() : null;
  return key && session.keys.includes(key) ? key : null;
}

ui.game.addEventListener("keydown", (event) => {
  const key = boundKey(event);
  if (!key) return;
  event.preventDefault();
  if (!held.includes(key)) { held.push(key); sendInput(); }
});
ui.game.addEventListener("keyup", (event) => {
  const key = boundKey(event);
  if (!key) return;
  event.preventDefault();
  const i = held.indexOf(key);
  if (i >= 0) { held.splice(i, 1); sendInput(); }
});
ui.game.addEventListener("blur", () => { if (held.length) { held.length = 0; sendInput(); } });
ui.game.addEventListener("click", () => {
  if (session?.info?.mouse_dim && document.pointerLockElement !== ui.game) ui.game.requestPointerLock?.();
});
document.addEventListener("mousemove", (event) => {
  if (document.pointerLockElement === ui.game) { mouse[0] += event.movementX; mouse[1] += event.movementY; }
});

function sendInput() {
  if (!session) return;
  send({ type: "input", keys: [...held], mouse });
  mouseSent = mouse[0] !== 0 || mouse[1] !== 0;
  if (session.keys) renderCaps(ui.heldKeys, session.keys, held);
  ui.heldMouse.textContent = mouseSent ? `mouse ${mouse[0]},${mouse[1]}` : "";
  mouse = [0, 0];
}
setInterval(() => { if (mouse[0] || mouse[1] || mouseSent) sendInput(); }, INPUT_TICK_MS);

// ---- image picker ------------------------------------------------------------------------------------------

function selectedDemo() {
  return document.querySelector('input[name="demo"]:checked')?.value ?? null;
}

function renderDemos() {
  ui.demos.replaceChildren(...config.demos.map((demo, i) => {
    const label = document.createElement("label");
    const radio = Object.assign(document.createElement("input"), { type: "radio", name: "demo", value: demo.name,
                                                                  checked: i === 0 });
    radio.addEventListener("change", () => { upload = null; ui.upload.value = ""; ui.preview.hidden = true; clearError(); });
    const img = Object.assign(document.createElement("img"), { src: demo.url, alt: "" });
    label.append(radio, img, document.createTextNode(demo.name));
    return label;
  }));
}

ui.upload.addEventListener("change", async () => {
  const file = ui.upload.files[0];
  upload = null;
  ui.preview.hidden = true;
  if (!file) return;
  clearError();
  const refuse = (why) => { showError(why); ui.upload.value = ""; };
  if (file.size > config.limits.max_image_bytes) {
    return refuse(`“${file.name}” is ${mib(file.size)}; the gateway takes images up to ` +
                  `${mib(config.limits.max_image_bytes)}.`);
  }
  if (!["image/png", "image/jpeg"].includes(file.type)) {
    return refuse(`“${file.name}” is not a PNG or JPEG image (${file.type || "unknown type"}); ` +
                  `choose a PNG or JPEG file.`);
  }
  try {
    (await createImageBitmap(file)).close();
  } catch {
    return refuse(`“${file.name}” could not be read as an image; it may be damaged. Choose another PNG or JPEG file.`);
  }
  upload = { name: file.name, file };
  for (const radio of document.querySelectorAll('input[name="demo"]')) radio.checked = false;
  ui.preview.src = URL.createObjectURL(file);
  ui.preview.alt = `Uploaded image ${file.name}`;
  ui.preview.hidden = false;
});

function base64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

ui.clip.addEventListener("change", async () => {
  const file = ui.clip.files[0];
  clip = null;
  if (!file) return;
  clearError();
  const refuse = (why) => { showError(why); ui.clip.value = ""; };
  const limit = config.limits.max_video_bytes;
  if (file.size > limit) {
    return refuse(`“${file.name}” is ${mib(file.size)}; the gateway takes clips up to ${mib(limit)} (the ` +
                  `decoder takes a start message of 32 MiB at most). Trim it to a few seconds.`);
  }
  const typed = ["video/mp4", "video/webm"].includes(file.type) || (!file.type && /\.(mp4|webm)$/i.test(file.name));
  const head = new Uint8Array(await file.slice(0, 12).arrayBuffer());
  const ascii = String.fromCharCode(...head.slice(4, 8));
  const magic = ascii === "ftyp" || (head[0] === 0x1a && head[1] === 0x45 && head[2] === 0xdf && head[3] === 0xa3);
  if (!typed || !magic) {
    return refuse(`“${file.name}” is not an MP4 or WebM video (${file.type || "unknown type"}); choose a short ` +
                  ".mp4 or .webm clip.");
  }
  clip = { name: file.name, file };
});

// ---- start and stop ----------------------------------------------------------------------------------------

// The start's conditioning: the prompt if the deployment takes one (or may: not known yet) and one was typed.
function conditioning() {
  const prompt = ui.prompt.value.trim();
  if (clip && !ui.clipSetup.hidden) {
    const clipPrompt = ui.clipPrompt.value.trim();
    if (!clipPrompt) return { error: "Describe the clip: type what it shows (the model reads the clip under it)." };
    if (!prompt) return { error: "Type the prompt of what happens after the clip." };
    return { prompt, clip, clipPrompt };
  }
  if (deployment?.text) return prompt ? { prompt } : { error: "Type a prompt first: this deployment is text-to-video." };
  if (prompt && !deployment) return { prompt };
  const demo = selectedDemo();
  if (!upload && !demo) return { error: "Choose a demo image or upload a PNG or JPEG first." };
  return { image: upload ? null : { demo } };
}

async function start() {
  clearError();
  const chosen = conditioning();
  if (chosen.error) return showError(chosen.error);
  const seed = Number(ui.seed.value);
  if (!Number.isSafeInteger(seed) || seed < 0) return showError("The seed must be a whole number, 0 or more.");
  ui.start.disabled = true;
  try {
    if (!ws) await connect();
    const transport = ui.transport.value;
    const source = chosen.clip ? { prompt: chosen.prompt, video_prompt: chosen.clipPrompt,
                                   video: { name: chosen.clip.name, data: await base64(chosen.clip.file) } }
      : chosen.prompt ? { prompt: chosen.prompt }
      : { image: chosen.image ?? { name: upload.name, data: await base64(upload.file) } };
    session = {
      info: null, keys: null, blocks: new Map(), blockBySeq: [], sent: new Map(), drawnSeq: -1, anchor: null,
      paintTimes: [], latencies: [], unreported: [], shownBlock: null, echoShown: false, pc: null, switches: new Map(),
    };
    Object.assign(stats, { frames: 0, samples: [], blocks: 0, bytes: 0, ended: null, switches: [], clip: null,
                           phases: [] });
    ui.frameCount.textContent = "0"; ui.clipFrames.textContent = "–"; ui.blockIndex.textContent = "–"; ui.fps.textContent = "–";
    ui.latency.textContent = "–"; ui.echoKeys.textContent = "–"; ui.echoKeys.dataset.keys = "";
    ui.download.hidden = true; ui.switchStatus.hidden = true;
    const message = { type: "start", ...source, seed, transport, record: ui.record.checked };
    if (transport === "webrtc") message.offer = await webrtcOffer(session);
    send(message);
    ui.stop.disabled = false;
    const what = chosen.clip ? "clip and both prompts" : chosen.prompt ? "prompt" : "image";
    setStatus(`Starting a session: the decoder encodes the ${what} and warms its caches…`);
  } catch (e) {
    showError(`Could not start: ${e.message}`);
    endSession(null);
  }
}

async function webrtcOffer(current) {
  const pc = new RTCPeerConnection();
  current.pc = pc;
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.ontrack = (event) => {
    ui.video.srcObject = event.streams[0] ?? new MediaStream([event.track]);
    ui.video.play().catch(() => {});
    watchVideo(current);
  };
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => { // the gateway takes no trickled candidates: gather them all first
    if (pc.iceGatheringState === "complete") return resolve();
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 3000);
  });
  return pc.localDescription.sdp;
}

function switchPrompt(event) {
  event.preventDefault();
  const prompt = ui.switchPrompt.value.trim();
  if (!session?.info?.prompt_switching) return;
  if (!prompt) return showError("Type the new prompt first.");
  clearError();
  send({ type: "switch", prompt });
  setStatus("Prompt switch sent: it takes effect at the next block the gateway requests.");
}

function stop() {
  send({ type: "stop" });
  ui.stop.disabled = true;
  setStatus("Stopping after the block in progress…");
}

function endSession(recordingUrl) {
  if (session?.pc) session.pc.close();
  if (document.pointerLockElement === ui.game) document.exitPointerLock();
  session = null;
  held.length = 0;
  ui.switchButton.disabled = true;
  ui.start.disabled = false;
  ui.stop.disabled = true;
  if (recordingUrl) { ui.download.href = recordingUrl; ui.download.hidden = false; }
}

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", stop);
ui.switchForm.addEventListener("submit", switchPrompt);

// ---- boot --------------------------------------------------------------------------------------------------

async function boot() {
  try {
    config = await (await fetch("/api/config")).json();
  } catch (e) {
    setStatus("Cannot reach the gateway.");
    return showError(`Could not load /api/config: ${e.message}`);
  }
  renderDemos();
  showDeployment(config.deployment);
  const names = { jpeg: "JPEG over WebSocket", webrtc: "WebRTC video" };
  const transports = config.transports.filter((t) => t !== "webrtc" || "RTCPeerConnection" in window);
  ui.transport.replaceChildren(...transports.map((t) => new Option(names[t], t, false, t === config.default_transport)));
  try {
    await connect();
  } catch (e) {
    setStatus("Cannot reach the gateway.");
    return showError(e.message);
  }
  ui.start.disabled = false;
  setStatus(!deployment ? "Type a prompt or choose an image, and press Start."
    : deployment.text ? "Type a prompt and press Start." : "Choose an image and press Start.");
}
boot();
