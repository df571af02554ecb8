// Drives the dashboard in headless Chromium (Debian's, through playwright-core) for
// e2e/dashboard.rs. Input from the environment: VMX_URL (the controller), VMX_TOKEN,
// VMX_EXPECT (JSON: {machines: [names], running: [instance ids]} as the API reports them),
// VMX_SHOT (where to save the screenshot). Prints one JSON line of findings; exits non-zero,
// saying why, on the first check that fails.
import { createRequire } from "node:module";
import path from "node:path";

// ES modules ignore NODE_PATH: resolve playwright-core from the directory it names (where
// scripts/install-test-tools.sh puts it).
const require = createRequire(path.join(process.env.NODE_PATH, "resolve.js"));
const { chromium } = require("playwright-core");

const url = process.env.VMX_URL;
const token = process.env.VMX_TOKEN;
const expect = JSON.parse(process.env.VMX_EXPECT);
const found = {};

function check(ok, what) {
  if (!ok) throw new Error(what);
}

const browser = await chromium.launch({
  executablePath: process.env.VMX_CHROMIUM || "/usr/bin/chromium",
  headless: true,
  // Root in a test machine: Chromium's sandbox needs user namespaces it may not get.
  args: ["--no-sandbox"],
});
try {
  // The controller's certificate comes from the matrix's own authority.
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1400, height: 1000 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));

  // 1. No token: the page asks for one, and shows nothing.
  await page.goto(url + "/");
  await page.locator("#token-dialog[open]").waitFor({ timeout: 10000 });
  found.asked_for_token = true;
  check((await page.locator("#status").textContent()).includes("token"), "the status does not say a token is needed");

  // The API refuses a call without the token.
  const refused = await page.evaluate(async () => {
    const r = await fetch("/api/v1/operations", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ op: "drain", machine: "rm1" }) });
    return { status: r.status, body: await r.text() };
  });
  check(refused.status === 401, "an operation without a token was not refused: " + JSON.stringify(refused));
  found.refused_without_token = refused.status;

  // 2. The token, typed into the dialog (keyboard only).
  await page.getByLabel("Token", { exact: true }).fill(token);
  await page.getByLabel("Token", { exact: true }).press("Enter");
  await page.locator("#status", { hasText: "live" }).waitFor({ timeout: 15000 });
  for (const m of expect.machines) {
    await page.locator(`.machine[data-machine="${m}"]`).waitFor({ timeout: 15000 });
  }
  for (const id of expect.running) {
    await page.locator(`.cell[data-instance="${id}"][data-state="running"]`).waitFor({ timeout: 15000 });
  }
  found.machines = await page.locator(".machine").evaluateAll((ms) => ms.map((m) => m.dataset.machine));
  found.cells = await page.locator(".cell").evaluateAll((cs) => cs.map((c) => [c.dataset.instance, c.closest(".machine").dataset.machine]));
  check(found.machines.length === expect.machines.length, "machines shown " + found.machines + " but the API has " + expect.machines);

  // 3. A migration started from the page's menu shows in the matrix and the feed.
  const id = expect.running[0];
  const from = found.cells.find((c) => c[0] === id)[1];
  const to = expect.machines.find((m) => m !== from);
  await page.getByLabel("Action for " + id).selectOption("migrate:" + to);
  await page.getByLabel("Do the chosen action on " + id).click();
  await page.locator(`.machine[data-machine="${to}"] .cell[data-instance="${id}"][data-state="running"]`).waitFor({ timeout: 120000 });
  found.moved = { id, from, to };
  const event = page.locator("#events li", { hasText: `migrate ${id} ${from} → ${to}` });
  await event.first().waitFor({ timeout: 30000 });
  found.event = (await event.first().textContent()).trim();
  found.result = (await page.locator("#result").textContent()).trim();
  // What it uses at its new place, as its machine reports (the figures /metrics gives).
  const use = page.locator(`.machine[data-machine="${to}"] .cell[data-instance="${id}"] .use`, { hasText: "MiB resident" });
  await use.waitFor({ timeout: 30000 });
  found.use = (await use.textContent()).trim();

  // 4. Forget the token: the action controls ask for it again and send nothing.
  await page.getByRole("button", { name: "Forget token" }).click();
  await page.getByLabel("Action for " + id).selectOption({ index: 1 });
  await page.getByLabel("Do the chosen action on " + id).click();
  await page.locator("#token-dialog[open]").waitFor({ timeout: 5000 });
  found.result_without_token = (await page.locator("#result").textContent()).trim();
  check(found.result_without_token.includes("no token"), "an action without a token said " + found.result_without_token);
  await page.getByRole("button", { name: "Cancel" }).click();

  await page.screenshot({ path: process.env.VMX_SHOT, fullPage: true });
  found.screenshot = process.env.VMX_SHOT;

  // 5. On a phone's screen (390 × 844): one column, nothing wider than the screen, the cells and
  // their controls still there.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForTimeout(300);
  const phone = await page.evaluate(() => ({
    overflow: document.documentElement.scrollWidth - window.innerWidth,
    cut: [...document.querySelectorAll(".machine")].filter((m) => m.getBoundingClientRect().right > window.innerWidth + 1).length,
    cell: !!document.querySelector(".cell[data-instance] select"),
  }));
  check(phone.overflow <= 1, "the page is " + phone.overflow + " px wider than a phone's screen");
  check(phone.cut === 0, phone.cut + " machine column(s) reach past a phone's screen");
  check(phone.cell, "no instance cell with its menu on a phone's screen");
  found.phone = phone;
  await page.screenshot({ path: process.env.VMX_SHOT.replace(/\.png$/, "-phone.png"), fullPage: true });
  check(errors.length === 0, "errors in the page: " + errors.join("; "));
  console.log(JSON.stringify(found));
} finally {
  await browser.close();
}
