"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``).

No driver and no websocket: Chromium reads commands on descriptor 3 and writes
answers and events on descriptor 4, each a JSON object ended by a NUL byte.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

__all__ = ["Browser", "chromium"]

_WIRE = ("import os, sys; r, w = os.dup(int(sys.argv[1])), os.dup(int(sys.argv[2])); "
         "os.dup2(r, 3); os.dup2(w, 4); os.set_inheritable(3, True); os.set_inheritable(4, True); "
         "os.execv(sys.argv[3], sys.argv[3:])")


def chromium():
    """The Chromium executable, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, width=1280, height=900):
        self.profile = tempfile.mkdtemp(prefix="ltcp-chromium-")
        commands_r, self._commands = os.pipe()
        self._answers, answers_w = os.pipe()
        args = [chromium(), "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage",
                f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"]
        # A small Python puts the pipes on descriptors 3 and 4 (copied first, so neither clobbers
        # the other), then becomes Chromium.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WIRE, str(commands_r), str(answers_w), *args],
            pass_fds=(commands_r, answers_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(commands_r)
        os.close(answers_w)
        self._buffer = b""
        self._next_id = 0
        self.session = None

    def _send(self, method, params=None, session=None):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        return self._next_id

    def call(self, method, params=None, session=None, timeout=30):
        """Send a command and wait for its answer (events meanwhile are skipped)."""
        wanted = self._send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"chromium did not answer {method}")
                chunk = os.read(self._answers, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium exited")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            message = json.loads(raw)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def open(self, url):
        """Open ``url`` in a new page that later calls act on."""
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                           session=self.session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def fast_forward(self, ms):
        """Let the page's timers run ``ms`` of virtual time as fast as they can (pausing while a fetch is out)."""
        self.call("Emulation.setVirtualTimePolicy", {"policy": "pauseIfNetworkFetchesPending", "budget": ms},
                  session=self.session)

    def screenshot(self, path):
        import base64
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=self.session)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for fd in (self._commands, self._answers):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)
