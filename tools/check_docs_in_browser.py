"""Open the built documentation in a headless Chromium and check that its maths and images render.

    make docs
    .venv/bin/python tools/check_docs_in_browser.py [--html docs/_build/html]
        [--browser /usr/bin/chromium] [--screenshots DIR] [PAGE.html ...]

The pages are served from a local HTTP server (so a probe page of the same origin can look inside
them) and loaded one by one in an iframe. For each page it reports the maths Sphinx wrote
(``span.math``/``div.math``), how many MathJax typeset (``mjx-container``), MathJax errors, and
images that did not load. Exit status 1 when any maths is left untypeset, MathJax reports an error
or an image is broken. Needs a Chromium (Debian: ``apt-get install chromium``); not part of the
test suite, which builds the site with warnings as errors but has no browser.
"""
import argparse
import functools
import html
import http.server
import json
import os.path as osp
import re
import shutil
import subprocess
import sys
import threading

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_PAGES = ['index.html', 'user_guide/layer.html', 'api.html', 'evidence.html', 'cost.html',
                 'reproducing.html']
PROBE_PATH = '/__check_docs_probe__.html'
# Loads each page in an iframe, waits for MathJax's typesetting (or 20 s), then writes what it saw
# into <pre id="result"> for --dump-dom to print.
PROBE = """<!doctype html><html><body><pre id="result">pending</pre><script>
const pages = %s;
function settle(win) {
  const started = win.MathJax && win.MathJax.startup && win.MathJax.startup.promise;
  const timeout = new Promise(resolve => setTimeout(resolve, 20000));
  return Promise.race([started || Promise.resolve(), timeout]);
}
async function inspect(page) {
  const frame = document.createElement('iframe');
  frame.style.width = '1200px'; frame.style.height = '900px';
  const loaded = new Promise(resolve => frame.onload = resolve);
  frame.src = page;
  document.body.appendChild(frame);
  await loaded;
  const win = frame.contentWindow, doc = frame.contentDocument;
  // MathJax loads deferred: wait until its object exists on pages that have maths
  const hasMath = doc.querySelectorAll('span.math, div.math').length > 0;
  for (let i = 0; hasMath && !win.MathJax?.startup?.promise && i < 100; i++)
    await new Promise(resolve => setTimeout(resolve, 100));
  await settle(win);
  const images = Array.from(doc.images);
  const result = {
    page,
    math: doc.querySelectorAll('span.math, div.math').length,
    typeset: doc.querySelectorAll('mjx-container').length,
    math_errors: doc.querySelectorAll('mjx-merror, [data-mjx-error]').length,
    images: images.length,
    broken_images: images.filter(img => !img.complete || img.naturalWidth === 0)
                         .map(img => img.src),
  };
  frame.remove();
  return result;
}
(async () => {
  const results = [];
  for (const page of pages) results.push(await inspect(page));
  document.getElementById('result').textContent = JSON.stringify(results);
})();
</script></body></html>"""


class Handler(http.server.SimpleHTTPRequestHandler):
    probe = b''

    def do_GET(self):
        if self.path == PROBE_PATH:
            self.send_response(200)
            self.send_header('Content-Type', 'text/html; charset=utf-8')
            self.send_header('Content-Length', str(len(self.probe)))
            self.end_headers()
            self.wfile.write(self.probe)
            return
        super().do_GET()

    def log_message(self, *args):  # quiet: the report is the output
        pass


def find_browser(name):
    for candidate in [name] if name else ['chromium', 'chromium-browser', 'google-chrome']:
        path = shutil.which(candidate)
        if path:
            return path
    raise SystemExit('no Chromium found: install one (Debian: apt-get install chromium) or pass '
                     '--browser PATH')


def chromium_args(browser):
    # --no-sandbox: Chromium refuses to run as root with its sandbox (containers, CI)
    return [browser, '--headless', '--disable-gpu', '--no-sandbox', '--hide-scrollbars']


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('pages', nargs='*', default=DEFAULT_PAGES,
                        help='pages relative to --html (default: %(default)s)')
    parser.add_argument('--html', default=osp.join(REPO, 'docs', '_build', 'html'))
    parser.add_argument('--browser', help='Chromium executable (default: found on PATH)')
    parser.add_argument('--screenshots', metavar='DIR', help='also save a PNG of each page here')
    parser.add_argument('--timeout', type=float, default=180, help='seconds for the whole check')
    args = parser.parse_args(argv)
    for page in args.pages:
        if not osp.isfile(osp.join(args.html, page)):
            raise SystemExit(f'{page} not found under {args.html}: run make docs first')
    browser = find_browser(args.browser)

    Handler.probe = (PROBE % json.dumps(['/' + p for p in args.pages])).encode()
    server = http.server.ThreadingHTTPServer(
        ('127.0.0.1', 0), functools.partial(Handler, directory=args.html))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f'http://127.0.0.1:{server.server_address[1]}'
    try:
        proc = subprocess.run(
            chromium_args(browser) + ['--virtual-time-budget=120000', '--dump-dom',
                                      base + PROBE_PATH],
            capture_output=True, text=True, timeout=args.timeout)
        match = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.S)
        if not match or match.group(1) == 'pending':
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit('the probe page did not finish: no result from the browser')
        results = json.loads(html.unescape(match.group(1)))
        if args.screenshots:
            for page in args.pages:
                out = osp.join(args.screenshots, page.replace('/', '_').replace('.html', '.png'))
                subprocess.run(chromium_args(browser) + [
                    '--virtual-time-budget=20000', '--window-size=1280,2400', f'--screenshot={out}',
                    f'{base}/{page}'], capture_output=True, timeout=args.timeout, check=True)
    finally:
        server.shutdown()

    version = subprocess.run([browser, '--version'], capture_output=True, text=True).stdout
    print(f'browser: {version.strip()}')
    failed = False
    for r in results:
        bad = (r['typeset'] < r['math'] or r['math_errors'] or r['broken_images'])
        failed |= bool(bad)
        print(f"{'FAIL' if bad else 'ok  '} {r['page']}: maths {r['typeset']}/{r['math']} typeset, "
              f"{r['math_errors']} MathJax errors; images {r['images'] - len(r['broken_images'])}"
              f"/{r['images']} loaded"
              + ''.join(f'\n     broken: {src}' for src in r['broken_images']))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
