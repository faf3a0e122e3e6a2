"""The dashboard in headless Chromium (Selenium): login, pages whose numbers match the journal,
live updates, actions with CSRF, hostile payloads that run nothing, the sandboxed report frame,
and the screenshots in docs/."""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from tests.harness import REPO, Agent, check_of, health, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PAYLOADS = sorted((REPO / "tests" / "hostile_payloads").glob("[0-9]*"))
# Every alert/confirm/prompt/print a page (or any frame that may run scripts) calls is recorded
# on the top window; CDP injects it into each new document before the page's own scripts.
DETECTOR = """
(function () {
  function hit(what) {
    try { (window.top.__xss = window.top.__xss || []).push(what + " " + location.href); }
    catch (e) { (window.__xss = window.__xss || []).push(what); }
  }
  window.alert = function () { hit("alert"); };
  window.confirm = function () { hit("confirm"); };
  window.prompt = function () { hit("prompt"); };
  window.print = function () { hit("print"); };
})();
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Beacon:
    """A local server: /control serves the raw payloads (no escaping, no CSP); anything else
    that is requested is a hit (something a page tried to load)."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.control = ""
        beacon = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/control":
                    body = beacon.control.encode("utf-8", "surrogateescape")
                    self.send_response(200)
                    self.send_header("content-type", "text/html; charset=utf-8")
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path != "/favicon.ico":
                    beacon.hits.append(self.path)
                self.send_response(404)
                self.end_headers()

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def payload_texts(beacon: str) -> list[tuple[str, str]]:
    out = []
    for path in PAYLOADS:
        data = path.read_bytes().replace(b"BEACON", f"{beacon}/b/{path.stem}".encode())
        out.append((path.stem, data.decode("utf-8", "replace").replace("\x00", "")))
    return out


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--disable-background-networking",
    ):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": DETECTOR})
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def dashboard_agent(make_agent, **web: Any) -> tuple[Agent, str]:
    port = free_port()
    agent = make_agent({"web": {"listen": f"127.0.0.1:{port}", **web}}).start()
    return agent, f"http://127.0.0.1:{port}"


def login(agent: Agent, driver: Any) -> None:
    url = agent.ctl("dashboard").stdout.decode().strip()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/login\?token=[\w-]+", url), url
    driver.get(url)
    wait_for(lambda: driver.find_elements("id", "processes"), what="the overview after login")


def text_of(driver: Any, what: str, by: str = "id") -> str:
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(5):
        try:  # a live update or a navigation may swap the element between finding and reading
            return str(driver.find_element(by, what).text)
        except StaleElementReferenceException:
            time.sleep(0.1)
    return str(driver.find_element(by, what).text)


def fired(driver: Any) -> list[str]:
    return list(driver.execute_script("return window.__xss || []"))


def no_alert(driver: Any) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        driver.switch_to.alert  # noqa: B018 - raises when there is none
    except NoAlertPresentException:
        return True
    return False


# ---------------------------------------------------------------- without a browser


@pytest.mark.slow
def test_nothing_without_a_login_and_actions_need_the_csrf_token(make_agent) -> None:
    agent, base = dashboard_agent(make_agent)
    todo = agent.add("Private title 7f3a")
    assert agent.ctl("complete", str(todo), "--output", "private output 7f3a").returncode == 0
    status = agent.wait_states(todo, "cleaned")
    cid = status["entries"][0]["completion_id"]
    paths = ["/", "/inflight", "/completions", "/problems", f"/todo/{todo}"]
    for path in [*paths, f"/todo/{todo}/report/{cid}", "/api/version"]:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = requests.get(base + path, headers=headers, timeout=10)
            assert r.status_code == 401, path
            assert "7f3a" not in r.text
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
    r = requests.post(base + "/action/emergency", data={"todo_id": todo}, timeout=10)
    assert r.status_code == 401

    # The bearer token (0600 in the state dir) lets a script in.
    token = agent.ctl("dashboard", "--token").stdout.decode().strip()
    assert (agent.state / "dashboard.token").stat().st_mode & 0o777 == 0o600
    bearer = {"Authorization": f"Bearer {token}"}
    for path in paths:
        r = requests.get(base + path, headers=bearer, timeout=10)
        assert r.status_code == 200, path
        assert "script-src 'self'" in r.headers["content-security-policy"]
    assert "private output 7f3a" in requests.get(base + "/completions", headers=bearer).text

    # A login URL works once and sets an HttpOnly, SameSite=Strict cookie.
    url = agent.ctl("dashboard").stdout.decode().strip()
    session = requests.Session()
    first = session.get(url, allow_redirects=False, timeout=10)
    assert first.status_code == 303
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert requests.get(url, timeout=10).status_code == 401
    page = session.get(base + "/inflight", timeout=10).text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    started = agent.add("Started")
    assert agent.ctl("start", str(started)).returncode == 0
    wait_for(lambda: f'data-todo="{started}"' in session.get(base + "/inflight").text)
    page = session.get(base + "/inflight", timeout=10).text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page)
    assert csrf is not None
    wrong = session.post(
        base + "/action/emergency", data={"todo_id": started, "csrf": "x" + csrf.group(1)}
    )
    assert wrong.status_code == 403
    assert not [e for e in agent.todo_status(started)["entries"] if e["kind"] == "emergency"]
    right = session.post(
        base + "/action/emergency",
        data={"todo_id": started, "csrf": csrf.group(1)},
        allow_redirects=False,
    )
    assert right.status_code == 303
    wait_for(
        lambda: [e for e in agent.todo_status(started)["entries"] if e["kind"] == "emergency"],
        what="the forced completion",
    )


def test_a_non_loopback_address_needs_tls(tmp_path) -> None:
    from protocol.config import ConfigError, _complete, parse

    path = tmp_path / "c.toml"
    path.write_text('[web]\nlisten = "0.0.0.0:8765"\n')
    with pytest.raises(ConfigError, match="tls_cert"):
        _complete(parse(path.read_bytes(), path), path)
    path.write_text('[web]\nlisten = "0.0.0.0:8765"\ntls_cert = "c.pem"\ntls_key = "k.pem"\n')
    assert _complete(parse(path.read_bytes(), path), path).web.listen == "0.0.0.0:8765"


# ---------------------------------------------------------------- in Chromium


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pages_render_match_the_journal_and_update_live(make_agent, browser) -> None:
    agent, base = dashboard_agent(make_agent)
    done = [agent.add(f"Done {i}") for i in range(3)]
    for todo in done:
        assert agent.ctl("complete", str(todo), "--output", f"result {todo}").returncode == 0
    refused = 424242  # not in the database: refused, a problem
    assert agent.ctl("complete", str(refused), "--output", "x").returncode == 0
    running = agent.add("Running")
    assert agent.ctl("start", str(running), "--timeout", "600").returncode == 0
    later = agent.add("Later")
    assert agent.ctl("complete", str(later), "--in", "1h", "--output", "x").returncode == 0
    for todo in done:
        agent.wait_states(todo, "cleaned")
    wait_for(lambda: agent.entry_states(refused) == ["failed"], what="the refusal")
    login(agent, browser)

    status = agent.status_json()
    assert status is not None
    backlog = sum(status["journal"].get(s, 0) for s in ("accepted", "collected", "written"))
    assert text_of(browser, "backlog") == str(backlog)
    assert text_of(browser, "dead") == str(status["journal"].get("dead", 0))
    processes = text_of(browser, "processes")
    for name, pid in status["children"].items():
        assert name in processes and str(pid) in processes
    checks = text_of(browser, "checks")
    assert "journal" in checks and "refused" in checks
    assert browser.find_elements("css selector", "svg#chart rect.bar")
    browser.save_screenshot(str(REPO / "docs" / "dashboard-overview.png"))

    browser.get(base + "/inflight")
    assert browser.find_elements("css selector", f'tr[data-todo="{running}"]')
    selector = f'#inflight tr[data-todo="{running}"] [data-due]'
    first = browser.find_element("css selector", selector).text

    def ticked() -> bool:
        from selenium.common.exceptions import StaleElementReferenceException

        try:  # a live update may swap the table meanwhile
            return bool(browser.find_element("css selector", selector).text != first)
        except StaleElementReferenceException:
            return False

    wait_for(ticked, 5, what="the countdown to tick")
    assert str(later) in text_of(browser, "scheduled")

    browser.get(base + "/completions")
    rows = browser.find_elements("css selector", "#completions tr[data-completion]")
    assert len(rows) == 4  # three completed, one refused
    for todo in done:
        [entry] = agent.todo_status(todo)["entries"]
        row = browser.find_element(
            "css selector", f'tr[data-completion="{entry["completion_id"]}"]'
        )
        assert f"result {todo}" in row.text and "end_to_end" in row.text

    # A completion made now appears without a reload.
    browser.execute_script("window.__marker = 'same page'")
    late = agent.add("Late")
    assert agent.ctl("complete", str(late), "--output", "late result").returncode == 0
    wait_for(lambda: "late result" in text_of(browser, "completions"), 20, what="the live update")
    assert browser.execute_script("return window.__marker") == "same page"

    browser.get(f"{base}/todo/{done[0]}")
    frame = browser.find_element("id", "report")
    assert frame.get_attribute("sandbox") == ""
    # The report's origin is opaque: the dashboard cannot reach into it nor it out (and the
    # session cookie is HttpOnly: no script of any page sees it).
    assert (
        browser.execute_script("return document.getElementById('report').contentDocument") is None
    )
    assert "completiond_session" not in browser.execute_script("return document.cookie")
    browser.switch_to.frame(frame)
    wait_for(lambda: f"result {done[0]}" in browser.find_element("tag name", "body").text)
    assert browser.find_elements("tag name", "h2")  # the stored Markdown, rendered
    assert "## " not in browser.find_element("tag name", "body").text
    browser.switch_to.default_content()
    browser.save_screenshot(str(REPO / "docs" / "dashboard-todo.png"))

    browser.get(base + "/problems")
    assert str(refused) in text_of(browser, "refused")
    assert text_of(browser, "ack-refused") == "Acknowledge refusals"  # shown in the screenshot
    browser.save_screenshot(str(REPO / "docs" / "dashboard-problems.png"))
    assert not fired(browser) and no_alert(browser)


def overview_check(driver: Any, base: str, name: str) -> str:
    """The state the overview shows for one health check."""
    driver.get(base + "/")
    return text_of(driver, f"//table[@id='checks']//tr[td[1]='{name}']/td[2]", by="xpath")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_acknowledging_refusals_needs_a_login_and_the_csrf_token(make_agent, browser) -> None:
    agent, base = dashboard_agent(make_agent, language="de")
    refused = 434343  # not in the database: refused
    assert agent.ctl("complete", str(refused), "--output", "x").returncode == 0
    wait_for(lambda: agent.entry_states(refused) == ["failed"], what="the refusal")
    login(agent, browser)
    wait_for(lambda: overview_check(browser, base, "refused") == "WARNING", what="the warning")

    def refusal_row() -> str:
        return text_of(browser, f'#refused tr[data-todo="{refused}"]', by="css selector")

    def press_ack(csrf: str | None = None) -> None:
        browser.get(base + "/problems")
        assert "bestätigt" not in refusal_row()
        assert text_of(browser, "ack-refused") == "Ablehnungen bestätigen"
        button = browser.find_element("id", "ack-refused")
        if csrf is not None:
            browser.execute_script(
                "arguments[0].form.querySelector('[name=csrf]').value = arguments[1]",
                button,
                csrf,
            )
        button.click()

    def body() -> str:
        return text_of(browser, "body", by="tag name")

    # A wrong CSRF token: refused, nothing changes.
    press_ack("wrong")
    wait_for(lambda: "CSRF token missing or wrong" in body(), what="the 403")
    assert check_of(health(agent)[1], "refused")["status"] == "WARNING"
    assert overview_check(browser, base, "refused") == "WARNING"

    # Without a login (the cookie gone, the page's token still in the form): refused too.
    browser.get(base + "/problems")
    button = browser.find_element("id", "ack-refused")
    browser.delete_all_cookies()
    button.click()
    wait_for(lambda: "Anmeldung nötig" in body(), what="the 401")
    assert check_of(health(agent)[1], "refused")["status"] == "WARNING"

    # Logged in, with the page's token: done; the check is clear and the list says so.
    login(agent, browser)
    press_ack()
    wait_for(lambda: browser.find_elements("id", "refused-acknowledged"), what="the ack note")
    assert browser.current_url == base + "/problems"
    assert "Ablehnungen bestätigt am" in text_of(browser, "refused-acknowledged")
    assert "bestätigt" in refusal_row()
    assert not browser.find_elements("id", "ack-refused")  # nothing left to acknowledge
    assert check_of(health(agent)[1], "refused")["status"] == "OK"
    assert overview_check(browser, base, "refused") == "OK"
    assert not fired(browser)


@pytest.mark.slow
@pytest.mark.timeout(600)  # 80 completions and 85 page loads; slow on a loaded machine
def test_hostile_payloads_run_no_script_on_any_page(make_agent, browser) -> None:
    from agent.store import open_store
    from ctl import Client

    beacon = Beacon()
    try:
        texts = payload_texts(beacon.base)
        assert len(texts) >= 50
        # The control page holds the same payloads raw: the detector must see them run.
        beacon.control = "<!DOCTYPE html><html><body>" + "".join(t for _, t in texts) + "</body>"
        browser.get(beacon.base + "/control")
        time.sleep(1.0)  # give the payloads' scripts and loads their chance
        if not no_alert(browser):
            browser.switch_to.alert.dismiss()
        assert fired(browser) or beacon.hits, "the detector did not see the control page run"
        browser.get("about:blank")
        beacon.hits.clear()

        agent, base = dashboard_agent(make_agent)
        store = open_store(f"sqlite:///{agent.sqlite_path}", timeout=5)
        try:
            store.ensure_schema(create_todo_table=True)
            todos = [store.add_todo(text[:200], text) for _, text in texts]
        finally:
            store.close()
        with Client(str(agent.config_path)) as client:
            for todo, (_, text) in zip(todos, texts, strict=True):
                client.complete(todo, output=text)
            client.complete(999_999, output=texts[0][1])  # refused: the problems page shows it
        wait_for(
            lambda: (agent.status_json() or {}).get("journal", {}).get("cleaned", 0) >= len(todos),
            300,
            what="every hostile completion written",
        )
        login(agent, browser)
        pages = ["/", "/inflight", "/completions", "/problems"]
        pages += [f"/todo/{todo}" for todo in todos]
        for path in pages:
            browser.get(base + path)
            assert no_alert(browser), path
        time.sleep(1.0)
        assert no_alert(browser)
        assert not fired(browser)
        assert not beacon.hits, beacon.hits[:10]
        browser.get(base + "/completions")
        rows = browser.find_elements("css selector", "#completions tr[data-completion]")
        assert len(rows) == len(todos) + 1  # every hostile completion is listed (and the refusal)
        assert "alert(1)" in text_of(browser, "completions")  # shown as text, never run
    finally:
        beacon.close()
