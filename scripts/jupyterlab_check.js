// Open notebooks in JupyterLab in headless Chromium and print, per notebook, whether it is marked changed once its kernel
// is idle (`dirty`) and the metadata JupyterLab holds. Paths are relative to the server's --notebook-dir.
//   npm install ws
//   .venv/bin/jupyter lab --no-browser --port 8899 --ServerApp.token=x --ServerApp.ip=127.0.0.1 --notebook-dir . \
//       --LabApp.expose_app_in_browser=True &
//   chromium --headless=new --no-sandbox --disable-gpu --remote-debugging-port=9222 about:blank &
//   node scripts/jupyterlab_check.js [--save] nbs/index.ipynb nbs/03_prompts.ipynb
// --save also saves each notebook unedited, so `git diff` shows what JupyterLab would write.
const WebSocket = require('ws');
const args = process.argv.slice(2);
const doSave = args.includes('--save');
const nbs = args.filter(a => !a.startsWith('--'));
const sleep = ms => new Promise(r => setTimeout(r, ms));

async function cdp(wsUrl) {
  const ws = new WebSocket(wsUrl, { perMessageDeflate: false });
  await new Promise((res, rej) => { ws.on('open', res); ws.on('error', rej); });
  let id = 0; const pend = new Map();
  ws.on('message', m => { const d = JSON.parse(m); if (d.id && pend.has(d.id)) { pend.get(d.id)(d); pend.delete(d.id); } });
  const send = (method, params = {}) => new Promise(r => { const i = ++id; pend.set(i, r); ws.send(JSON.stringify({ id: i, method, params })); });
  const ev = async expr => {
    const r = await send('Runtime.evaluate', { expression: expr, awaitPromise: true, returnByValue: true });
    if (r.result.exceptionDetails) return { error: r.result.exceptionDetails.exception?.description };
    return r.result.result.value;
  };
  return { ws, send, ev };
}

const PROBE = `(() => {
  const app = window.jupyterapp; if (!app) return {state: 'noapp'};
  const w = app.shell.currentWidget; if (!w || !w.context) return {state: 'nowidget'};
  const ctx = w.context; if (!ctx.isReady) return {state: 'notready'};
  const k = w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  const tab = document.querySelector('#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current');
  return {state: 'ok', path: ctx.path, dirty: ctx.model.dirty, kernel: k ? k.status : null,
          kernelName: w.sessionContext.kernelDisplayName, title: document.title,
          tabDirty: tab ? tab.classList.contains('jp-mod-dirty') : null,
          metadata: ctx.model.toJSON().metadata};
})()`;

(async () => {
  const out = [];
  for (const [i, nb] of nbs.entries()) {
    const url = `http://127.0.0.1:8899/lab/workspaces/chk${Date.now()}${i}/tree/${nb}?reset&token=x`;
    const t = await (await fetch('http://127.0.0.1:9222/json/new?' + encodeURIComponent(url), { method: 'PUT' })).json();
    const { ws, ev } = await cdp(t.webSocketDebuggerUrl);
    let p, idleSince = null;
    for (let s = 0; s < 90; s++) {           // up to ~90 s
      await sleep(1000);
      p = await ev(PROBE);
      if (p && p.state === 'ok' && p.kernel === 'idle') { idleSince ??= s; if (s - idleSince >= 5) break; }  // idle for 5 s
    }
    const rec = { nb, ...p };
    if (doSave && p.state === 'ok') {
      await ev(`window.jupyterapp.shell.currentWidget.context.save()`);
      await sleep(1000);
      rec.dirtyAfterSave = await ev(`window.jupyterapp.shell.currentWidget.context.model.dirty`);
    }
    // shut the session so kernels do not pile up, then close the tab
    await ev(`window.jupyterapp.shell.currentWidget.sessionContext.shutdown()`);
    await sleep(500);
    ws.close();
    await fetch('http://127.0.0.1:9222/json/close/' + t.id);
    out.push(rec);
    console.log(JSON.stringify(rec));
  }
})();
