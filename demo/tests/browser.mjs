// The browser test of the demo: Debian's headless Chromium (WebGPU on SwiftShader), driven by
// playwright-core, runs mask families on the served page through its form; checks that each run
// verified against the f64 reference, computed fewer tiles masked than dense, and that nothing
// was logged as an error; saves a screenshot; then checks that a browser without WebGPU is told so.
//
// Environment: DEMO_URL (default http://127.0.0.1:8000/), CHROMIUM (default /usr/bin/chromium),
// FAMILIES (default causal,documents), SEQ (256), HEADS (2), HEAD_DIM (32), SEED (random),
// SCREENSHOT (default demo/screenshot.png).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const env = process.env;
const url = env.DEMO_URL ?? 'http://127.0.0.1:8000/';
const executablePath = env.CHROMIUM ?? '/usr/bin/chromium';
const families = (env.FAMILIES ?? 'causal,documents').split(',');
const seq = env.SEQ ?? '256';
const heads = env.HEADS ?? '2';
const headDim = env.HEAD_DIM ?? '32';
const seed = env.SEED ?? String(Math.floor(Math.random() * 2 ** 32));
const screenshot = env.SCREENSHOT ?? join(dirname(fileURLToPath(import.meta.url)), '..', 'screenshot.png');
// The first page load compiles the kernels on SwiftShader: generous, but bounded.
const TIMEOUT_MS = 120_000;

// Flags for a machine without network or GPU; --enable-unsafe-webgpu is added where wanted.
const BASE_ARGS = [
  '--no-sandbox',
  '--disable-dev-shm-usage',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

const failures = [];
function check(ok, what) {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}`);
  if (!ok) failures.push(what);
}

/** Launches Chromium on a fresh profile; returns the context, a page and the console log. */
async function open(webgpu) {
  const profile = mkdtempSync(join(tmpdir(), 'blockflash-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: webgpu ? [...BASE_ARGS, '--enable-unsafe-webgpu'] : BASE_ARGS,
  });
  const page = context.pages()[0] ?? (await context.newPage());
  const errors = [];
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(`console: ${m.text()}`);
  });
  page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  page.setDefaultTimeout(TIMEOUT_MS);
  const close = async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  };
  return { page, errors, close };
}

const title = (page) => page.title();

async function withWebGpu() {
  const { page, errors, close } = await open(true);
  try {
    await page.goto(url);
    await page.waitForFunction(() => document.title === 'ready' || document.title.startsWith('error'));
    const t = await title(page);
    check(t === 'ready', `page opened WebGPU (title "${t}")`);
    if (t !== 'ready') return;
    console.log(await page.textContent('#status'));
    const report = await page.textContent('#report');
    console.log(report.split('\n').filter((l) => /shader-f16|timestamp|workgroup memory|invocations|tier/.test(l)).join('\n'));
    console.log(`seed ${seed}, N=${seq}, H=${heads}, d=${headDim}`);
    for (const [i, family] of families.entries()) {
      await page.selectOption('#family', family);
      await page.selectOption('#seq', seq);
      await page.selectOption('#heads', heads);
      await page.selectOption('#head-dim', headDim);
      await page.selectOption('#precision', 'f32');
      await page.fill('#seed', seed);
      await page.click('#run');
      await page.waitForFunction(
        (n) => JSON.parse(document.getElementById('result').textContent).length === n
          || document.title.startsWith('error'),
        i + 1,
      );
      const t2 = await title(page);
      check(t2 === 'done', `${family}: run finished (title "${t2}")`);
      if (t2 !== 'done') return;
    }
    const results = JSON.parse(await page.textContent('#result'));
    for (const r of results) {
      const name = `${r.mask} N=${r.seq} H=${r.heads} d=${r.head_dim} (${r.tier}, ${r.path}, ${r.tile.join('x')} tiles)`;
      console.log(`${name}: dense ${r.ms_dense.toFixed(3)} ms, masked ${r.ms_masked.toFixed(3)} ms ` +
        `(${r.clock}), speedup ${r.speedup.toFixed(2)}x, ideal ${r.ideal_speedup.toFixed(2)}x, ` +
        `tiles ${r.tiles_masked}/${r.tiles_dense}, error ${r.max_rel_error_masked} / ${r.max_rel_error_dense}`);
      check(r.verified === true
        && Number.isFinite(r.max_rel_error_masked) && r.max_rel_error_masked <= r.tolerance
        && Number.isFinite(r.max_rel_error_dense) && r.max_rel_error_dense <= r.tolerance,
      `${name}: output matches the f64 reference within ${r.tolerance}`);
      check(r.tiles_masked < r.tiles_dense, `${name}: masked computed fewer tiles (${r.tiles_masked}) than dense (${r.tiles_dense})`);
      check(r.ms_dense > 0 && r.ms_masked > 0, `${name}: both runs were timed`);
    }
    check(results.map((r) => r.mask).join() === families.join(), `ran ${families.join(', ')}`);
    await page.screenshot({ path: screenshot, fullPage: true });
    console.log(`screenshot: ${screenshot}`);
  } finally {
    check(errors.length === 0, `nothing logged as an error${errors.length ? `: ${errors.join(' | ')}` : ''}`);
    await close();
  }
}

async function withoutWebGpu() {
  const { page, errors, close } = await open(false);
  try {
    await page.goto(url);
    await page.waitForFunction(() => document.title !== 'loading');
    const status = await page.textContent('#status');
    check((await title(page)).startsWith('error') && status.includes('WebGPU is unavailable'),
      `without WebGPU the page says so ("${status}")`);
    check(errors.every((e) => !e.startsWith('page error')), 'without WebGPU nothing throws');
  } finally {
    await close();
  }
}

try {
  await withWebGpu();
  await withoutWebGpu();
} catch (e) {
  check(false, `browser test crashed: ${e.stack ?? e}`);
}
console.log(failures.length ? `${failures.length} check(s) failed` : 'browser test passed');
process.exit(failures.length ? 1 : 0);
