// The script of the demo page: opens WebGPU through the wasm module, runs the case the form asks
// for, and shows each run as a card and in #result (a JSON array, newest last).
//
// document.title tells a driver where the page is: "loading", "ready", "running", "done", or
// "error: <message>".
import init, { Demo, families } from './pkg/blockflash_demo.js';

const $ = (id) => document.getElementById(id);
const results = [];

function setStatus(text, isError = false) {
  $('status').textContent = text;
  $('status').className = isError ? 'error' : '';
}

function fail(message) {
  setStatus(message, true);
  document.title = `error: ${message}`;
}

const fmt = (x, digits = 3) => (typeof x === 'number' ? x.toPrecision(digits) : String(x));

// A card with the two canvases filled by the wasm module and a table filled from the result.
function newCard(title) {
  const card = document.createElement('section');
  card.className = 'card';
  card.innerHTML = `<h2></h2>
    <div class="pictures">
      <figure><canvas class="mask"></canvas><figcaption>mask (allowed pairs dark)</figcaption></figure>
      <figure><canvas class="block"></canvas><figcaption class="block-caption">block mask</figcaption></figure>
    </div>
    <table><tbody></tbody></table>`;
  card.querySelector('h2').textContent = title;
  $('cards').prepend(card);
  return card;
}

function fillCard(card, r) {
  const tile = `${r.tile[0]}×${r.tile[1]}`;
  card.querySelector('.block-caption').textContent =
    `block mask (${tile} tiles${r.reordered ? ', tokens reordered by RCM' : ''})`;
  const ok = (err) => (err !== null && err <= r.tolerance ? 'pass' : 'fail');
  const rows = [
    ['path', `${r.path} (tier ${r.tier})`],
    ['tiles computed', `${r.tiles_masked} masked / ${r.tiles_dense} dense (${tile} tiles; active ${fmt(100 * r.active_tiles)}%)`],
    ['dense', `${fmt(r.ms_dense)} ms`],
    ['masked', `${fmt(r.ms_masked)} ms`],
    ['speedup', `${fmt(r.speedup)}× (ideal ${fmt(r.ideal_speedup)}×)`],
    ['clock', r.clock === 'timestamps' ? 'GPU timestamp queries' : 'wall clock around a completed readback'],
    ['error masked', `<span class="${ok(r.max_rel_error_masked)}">${fmt(r.max_rel_error_masked)}</span>`],
    ['error dense', `<span class="${ok(r.max_rel_error_dense)}">${fmt(r.max_rel_error_dense)}</span>`],
    ['verified', r.verified
      ? `<span class="pass">yes</span> (${r.samples} sampled rows, f64 reference, tolerance ${r.tolerance})`
      : `<span class="fail">no</span> (tolerance ${r.tolerance})`],
  ];
  card.querySelector('tbody').innerHTML = rows.map(([k, v]) => `<tr><td>${k}</td><td>${v}</td></tr>`).join('');
  const plan = document.createElement('details');
  plan.innerHTML = '<summary>plan</summary><pre></pre>';
  plan.querySelector('pre').textContent = r.plan;
  card.append(plan);
}

async function runOnce(demo) {
  const family = $('family').value;
  const seq = Number($('seq').value);
  const heads = Number($('heads').value);
  const headDim = Number($('head-dim').value);
  const f16 = $('precision').value === 'f16';
  const seed = Number($('seed').value) >>> 0;
  const title = `${family} · N=${seq} · H=${heads} · d=${headDim} · ${f16 ? 'f16' : 'f32'} · seed ${seed}`;
  document.title = 'running';
  setStatus(`Running ${title}…`);
  $('run').disabled = true;
  const card = newCard(title);
  try {
    const c = demo.plan(family, seq, heads, headDim, f16, seed);
    c.draw(card.querySelector('canvas.mask'), card.querySelector('canvas.block'));
    const r = JSON.parse(await c.run());
    fillCard(card, r);
    results.push(r);
    $('result').textContent = `[\n${results.map((x) => JSON.stringify(x)).join(',\n')}\n]`;
    setStatus(`Done: ${title}. Adapter: ${demo.adapter()}; ${r.tier}; timing: ${demo.clock()}.`);
    document.title = 'done';
  } catch (e) {
    card.append(Object.assign(document.createElement('p'), { className: 'fail', textContent: String(e.message ?? e) }));
    fail(String(e.message ?? e));
  } finally {
    $('run').disabled = false;
  }
}

async function main() {
  try {
    await init();
  } catch (e) {
    fail(`the WebAssembly module did not load: ${e.message ?? e}`);
    return;
  }
  for (const f of families()) $('family').add(new Option(f, f));
  setStatus('Opening WebGPU…');
  let demo;
  try {
    demo = await Demo.open();
  } catch (e) {
    fail(String(e.message ?? e));
    return;
  }
  if (!demo.has_f16()) {
    const f16 = $('precision').querySelector('option[value=f16]');
    f16.disabled = true;
    f16.textContent = 'f16 (needs shader-f16)';
  }
  $('report').textContent = demo.report();
  setStatus(`Ready. Adapter: ${demo.adapter()}; timing: ${demo.clock()}.`);
  $('form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    runOnce(demo);
  });
  $('run').disabled = false;
  document.title = 'ready';
}

main();
