// The dashboard in a real browser: Debian's chromium, headless, driven by Playwright.
//
// Run by cli/tests/local.rs against a running `s3spot local serve`, with
//   DASHBOARD_URL  the URL serve printed (with its token)
//   DONE_KEY       a key whose job has succeeded
//   RUNNING_KEY    a key whose job is running, to be cancelled
//   SCREENSHOT     where to save a picture of the page
// Exits non-zero, saying why, at the first check that fails.

import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

const url = new URL(process.env.DASHBOARD_URL);
const { DONE_KEY, RUNNING_KEY, SCREENSHOT } = process.env;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

// Without a token, or with a wrong one, nothing is served: not the page, not the API.
for (const path of ['/', '/api/jobs', '/app.js']) {
  const bare = new URL(path, url);
  assert.equal((await fetch(bare)).status, 403, `${path} without the token`);
  bare.searchParams.set('token', '0'.repeat(64));
  assert.equal((await fetch(bare)).status, 403, `${path} with a wrong token`);
}
// A change from another origin (a page elsewhere that learned the URL) is refused too.
const cancelUrl = new URL('/api/cancel', url);
cancelUrl.search = url.search;
const forged = await fetch(cancelUrl, {
  method: 'POST',
  headers: { 'content-type': 'application/json', origin: 'http://evil.example' },
  body: JSON.stringify({ job: `s3://data/${RUNNING_KEY}` }),
});
assert.equal(forged.status, 403, 'a cancel from another origin');

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const problems = [];
  page.on('console', (message) => {
    if (message.type() === 'error') problems.push(message.text());
  });
  page.on('pageerror', (error) => problems.push(String(error)));

  // The page loads, names the pipeline, and lists the jobs just run.
  await page.goto(url.href);
  await page.locator('#pipeline', { hasText: 's3spot-local' }).waitFor();
  const row = (key) => page.locator(`#jobs tr.job[data-key="${key}"]`).first();
  await row(DONE_KEY).waitFor();
  await row(RUNNING_KEY).waitFor();
  await page.locator(`#jobs tr.job[data-key="${DONE_KEY}"] .badge.state-succeeded`).first().waitFor();

  // A job's status and its logs.
  await row(DONE_KEY).click();
  await page.locator('#detail').waitFor();
  await page.locator('#detail-status', { hasText: '"state": "succeeded"' }).waitFor();
  await page.locator('#detail-logs pre.log').first().waitFor();
  const status = JSON.parse(await page.locator('#detail-status').textContent());
  assert.equal(status.input.key, DONE_KEY);
  await page.locator('#close-detail').click();

  // The chart of the last days has a bar for today's job.
  await page.locator('#chart svg rect.bar').first().waitFor();

  await page.screenshot({ path: SCREENSHOT });

  // A cancel goes through only once it is confirmed: dismissed, the job runs on.
  await row(RUNNING_KEY).click();
  await page.locator('#detail-status').waitFor();
  const dialogs = [];
  page.once('dialog', (dialog) => {
    dialogs.push(dialog.message());
    dialog.dismiss();
  });
  await page.locator('#cancel').click();
  await page.waitForTimeout(1500);
  assert.equal(dialogs.length, 1, 'the cancel asked first');
  assert.match(dialogs[0], new RegExp(`Cancel the job for s3://data/${RUNNING_KEY}`));
  await page.locator(`#jobs tr.job[data-key="${RUNNING_KEY}"] .badge.state-running`).first().waitFor();

  page.once('dialog', (dialog) => {
    dialogs.push(dialog.message());
    dialog.accept();
  });
  await page.locator('#cancel').click();
  await page.locator('#message-bar:not([hidden])').waitFor();
  assert.match(await page.locator('#message').textContent(), /cancelled 1 instance/);
  assert.equal(dialogs.length, 2);
  // The page refreshes itself as the job ends.
  await page
    .locator(`#jobs tr.job[data-key="${RUNNING_KEY}"] .badge.state-cancelled`)
    .first()
    .waitFor({ timeout: 60_000 });

  assert.deepEqual(problems, [], 'no errors in the page');
} finally {
  await browser.close();
}
console.log('dashboard: every check passed');
