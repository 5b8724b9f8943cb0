"""The try-a-patent page (`make web`) in headless Chromium, as an examiner uses it: choose a model,
type a patent, press the button, read the answer, in Korean first, and correct it. Debian's
chromium and chromedriver and the Nanum fonts (installed by `make setup`), driven with Selenium;
the page talks to the real tritonserver through the client library. The first test leaves a
screenshot of the answered page in build/screenshots/."""
from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import select

from patent_classifier_client import PatentClassifier
from patent_classifier_client.patent_document import PatentDocument
from core.prediction_store import PredictionStore, feedback, predictions
from server.launcher import free_loopback_ports
from tests.conftest import KOELECTRA_MODEL, MODEL_NAME, PROJECT_ROOT
from tests.waiting import wait_until

pytestmark = [pytest.mark.browser, pytest.mark.server]  # headless Chromium on the page, against the real tritonserver

SCREENSHOTS = PROJECT_ROOT / "build" / "screenshots"

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Headless in a container as root: no sandbox, no GPU. The rest stop Chromium from calling out
# (the machine reaches no network; as root, connections were refused without them).
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1200,1800",
]
PAGE_START_TIMEOUT_S = 60
ANSWER_TIMEOUT_S = 60

PATENT = PatentDocument(
    ipc=["G06F 16/35", "G06N 3/08"],
    title="특허 문서를 분류하는 장치 및 그 방법",
    abstract="본 발명은 특허 문서의 청구범위와 요약을 입력받아 과학기술표준분류 코드를 추정하는 장치에 관한 것이다.",
    claims=["1. 특허 문서를 입력받는 입력부와 분류 코드를 출력하는 분류부를 포함하는 장치.", "2. 제1항에 있어서, 상기 분류부는 신경망 계층을 포함하는 장치."],
)


@contextlib.contextmanager
def running_page(classifier_url: str, log_path: Path, *options: str):
    """`python -m patent_classifier_client web` on a free loopback port, stopped afterwards; ``options`` go to it
    as given (TLS, token file). Yields the page's address and its process."""
    (port,) = free_loopback_ports(1)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "patent_classifier_client", "web", "--url", classifier_url, "--model", MODEL_NAME, "--port", str(port),
             *options],
            cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + PAGE_START_TIMEOUT_S
        while not _page_is_healthy(base_url):
            if process.poll() is not None:
                raise RuntimeError(f"the page exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page did not answer on {base_url} within {PAGE_START_TIMEOUT_S} s")
            time.sleep(0.25)
        yield base_url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _page_is_healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/_stcore/health", timeout=2) as answer:
            return answer.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # The system chromedriver, given explicitly, so Selenium never tries to fetch one.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def fill_and_submit(browser, base_url: str | None, document: PatentDocument | None) -> None:
    """Type ``document`` into the form (None: leave it empty) and press the button; ``base_url`` None
    stays on the page as it is (a model already chosen)."""
    if base_url is not None:
        browser.get(base_url)
    wait = WebDriverWait(browser, PAGE_START_TIMEOUT_S)
    wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, ".st-key-claims textarea"))
    values = {} if document is None else {
        ".st-key-ipc input": "; ".join(document.ipc),
        ".st-key-title input": document.title,
        ".st-key-abstract textarea": document.abstract,
        ".st-key-claims textarea": "\n".join(document.claims),
    }
    for selector, value in values.items():
        field = browser.find_element(By.CSS_SELECTOR, selector)
        field.send_keys(value)
        assert field.get_attribute("value") == value, f"{selector} did not take the typed text"
    button = next(b for b in browser.find_elements(By.CSS_SELECTOR, "button") if "Classify" in b.text)
    button.click()


def choose_model(browser, base_url: str, model: str) -> None:
    browser.get(base_url)
    # The chooser's button, not only its container: the container is drawn before the widget in it.
    WebDriverWait(browser, PAGE_START_TIMEOUT_S).until(
        lambda page: page.find_elements(By.CSS_SELECTOR, ".st-key-model button[aria-haspopup='listbox']"))[0].click()
    options = WebDriverWait(browser, PAGE_START_TIMEOUT_S).until(lambda page: page.find_elements(By.CSS_SELECTOR, "[role='option']"))
    next(option for option in options if option.text == model).click()
    WebDriverWait(browser, ANSWER_TIMEOUT_S).until(lambda page: text_of(page, ".st-key-caption").startswith(f"모델 {model} ·"))


def text_of(browser, selector: str, timeout_s: float = ANSWER_TIMEOUT_S) -> str:
    WebDriverWait(browser, timeout_s).until(lambda page: page.find_elements(By.CSS_SELECTOR, selector))
    return browser.find_element(By.CSS_SELECTOR, selector).text


@pytest.fixture(scope="module")
def page_on_server(server, tmp_path_factory):
    with running_page(server.grpc_url, tmp_path_factory.mktemp("web") / "page.log") as (base_url, _):
        yield base_url


def test_typed_patent_shows_top_class_bars_and_token_count_in_korean_first(browser, page_on_server, reference, tmp_path):
    expected, token_count = reference.probabilities(PATENT.render())
    ranked = [reference.labels[int(index)] for index in (-expected).argsort(kind="stable")[:5]]

    fill_and_submit(browser, page_on_server, PATENT)

    top_class = text_of(browser, ".st-key-top-class")
    assert top_class.startswith("가장 가능성 높은 분류 · Top class:")
    assert ranked[0].code in top_class and ranked[0].name in top_class
    bars = browser.find_elements(By.CSS_SELECTOR, ".st-key-classes [data-testid='stProgress']")
    assert len(bars) == 5
    bar_texts = [bar.text for bar in bars]
    assert [next(label.code for label in ranked if label.code in text) for text in bar_texts] == [label.code for label in ranked]
    assert f"{expected.max():.1%}" in bar_texts[0]
    assert text_of(browser, ".st-key-tokens") == (
        f"읽은 토큰 · Tokens read: {token_count} · 잘림 · Truncated: 아니오: 특허 전체를 읽었습니다 · no: the model read the whole patent"
    )
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "특허 분류 · Patent classifier" in page and "분류하기 · Classify" in page
    assert text_of(browser, ".st-key-caption").startswith(f"모델 {MODEL_NAME} · 분류 188개 가운데 가장 가능성 높은 5개 (예: KSCST-001 ")
    assert "연결할 수 없습니다" not in page
    # The picture an examiner sees; Hangul needs a Korean font in the headless browser (make setup: fonts-nanum).
    assert subprocess.run(["fc-list", ":lang=ko"], capture_output=True, text=True).stdout.strip(), "no Korean font: make fonts"
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(tmp_path / "web-page.png"))
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "web-page.png", SCREENSHOTS / "web-page-answer.png")


def test_the_model_chooser_lists_the_servers_models_and_the_caption_follows_the_choice(browser, page_on_server):
    choose_model(browser, page_on_server, KOELECTRA_MODEL)
    assert text_of(browser, ".st-key-caption").startswith(f"모델 {KOELECTRA_MODEL} · 분류 3개 가운데 가장 가능성 높은 3개")

    fill_and_submit(browser, None, PATENT)

    top_class = text_of(browser, ".st-key-top-class")
    assert any(name in top_class for name in ("긍정", "부정", "중립"))
    assert len(browser.find_elements(By.CSS_SELECTOR, ".st-key-classes [data-testid='stProgress']")) == 3


def test_an_empty_form_is_answered_in_korean_naming_what_to_fill_in(browser, page_on_server):
    fill_and_submit(browser, page_on_server, None)

    warning = text_of(browser, ".st-key-answer [data-testid='stAlert']")
    assert warning.startswith("특허 내용 · the patent 칸을 확인해 주세요: 발명의 명칭, 요약, 청구범위 가운데 하나 이상을 입력해 주세요.")
    assert "Please check" in warning


def test_page_classifies_through_tls_with_the_token_which_stays_off_its_command_line(browser, secure_server, reference, tmp_path):
    secure = secure_server
    options = ("--tls-ca", str(secure.certificates.ca), "--token-file", str(secure.token_file))
    with running_page(secure.server.grpc_url, tmp_path / "page.log", *options) as (base_url, process):
        fill_and_submit(browser, base_url, PATENT)
        expected, _ = reference.probabilities(PATENT.render())
        top = reference.labels[int(expected.argmax())]
        assert top.code in text_of(browser, ".st-key-top-class")
        command_line = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode()
        assert "streamlit" in command_line and "--tls-ca" in command_line
        assert secure.token not in command_line


def test_page_says_clearly_when_the_server_is_down(browser, tmp_path):
    (nobody_listens,) = free_loopback_ports(1)
    with running_page(f"127.0.0.1:{nobody_listens}", tmp_path / "page.log") as (base_url, _):
        fill_and_submit(browser, base_url, PATENT)

        answer = text_of(browser, ".st-key-answer [data-testid='stAlert']")
        banner = text_of(browser, ".st-key-server-status")
        for shown in (answer, banner):
            assert shown.startswith("분류 서버에 연결할 수 없습니다. 잠시 후 다시 시도해 주세요.")
            assert f"시스템 담당자에게 이 주소를 알려 주세요: 127.0.0.1:{nobody_listens} (grpc)" in shown
            assert "The classifier server cannot be reached." in shown
            assert "make serve" not in shown  # an examiner does not start servers
        assert not browser.find_elements(By.CSS_SELECTOR, ".st-key-top-class")


def recorded_predictions(exported, text: str) -> set[str]:
    """The ids of the recorded predictions of ``text``."""
    text_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
    store = PredictionStore(exported.records_database)
    try:
        with store.engine.connect() as connection:
            return set(connection.scalars(select(predictions.c.id).where(predictions.c.text_sha256 == text_hash)))
    finally:
        store.close()


def corrections_of(exported, prediction_ids: set[str]) -> list[tuple]:
    store = PredictionStore(exported.records_database)
    try:
        with store.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(
                select(feedback.c.correct_label, feedback.c.verdict, feedback.c.examiner_id, predictions.c.top_label)
                .join(predictions, predictions.c.id == feedback.c.prediction_id)
                .where(feedback.c.prediction_id.in_(prediction_ids))
            )]
    finally:
        store.close()


def feedback_button(browser, words: str):
    return next(b for b in browser.find_elements(By.CSS_SELECTOR, ".st-key-feedback button") if words in b.text)


def pick_class(browser, label) -> None:
    picker = WebDriverWait(browser, ANSWER_TIMEOUT_S).until(
        lambda page: page.find_elements(By.CSS_SELECTOR, ".st-key-right-class input"))[0]
    picker.click()
    picker.send_keys(f"{label.code} · {label.name}")  # the option's own text: its code alone also matches others
    picker.send_keys(Keys.ENTER)


def classified_on_the_page(browser, page_on_server, exported, reference) -> tuple[list, str]:
    """The patent typed and classified; the classes in the offline model's order and the id the page's answer has."""
    expected, _ = reference.probabilities(PATENT.render())
    ranked = [reference.labels[int(index)] for index in (-expected).argsort(kind="stable")]
    before = recorded_predictions(exported, PATENT.render())
    fill_and_submit(browser, page_on_server, PATENT)
    assert ranked[0].code in text_of(browser, ".st-key-top-class")
    (prediction_id,) = wait_until(lambda: recorded_predictions(exported, PATENT.render()) - before, "the page's answer recorded")
    return ranked, prediction_id


def test_an_examiner_types_an_id_picks_the_right_class_and_one_click_on_wrong_records_it(browser, page_on_server, exported, reference):
    """Before: the examiner-id box sat outside the correction form, and the click that followed typing
    in it was lost (nothing recorded, nothing shown); 맞음 stayed clickable after the correction."""
    ranked, prediction_id = classified_on_the_page(browser, page_on_server, exported, reference)
    right = ranked[7]  # not among the five the page shows: the picker offers every class

    pick_class(browser, right)
    browser.find_element(By.CSS_SELECTOR, ".st-key-examiner-id input").send_keys("e-42")  # no Enter: the click follows
    feedback_button(browser, "This is wrong").click()

    result = text_of(browser, ".st-key-feedback-result")
    assert result.startswith(f"기록했습니다: 이 특허의 올바른 분류는 {right.code} (모델 틀림)")
    assert f"Recorded: {right.code} is right for this patent (the model was wrong)" in result
    assert corrections_of(exported, {prediction_id}) == [(right.code, "wrong", "e-42", ranked[0].code)]
    # The answer has its correction: nothing on the form applies any more.
    for words in ("This is right", "This is wrong"):
        assert not feedback_button(browser, words).is_enabled()
    assert browser.find_element(By.CSS_SELECTOR, ".st-key-examiner-id input").get_attribute("disabled") is not None


def test_a_correction_refused_as_the_second_one_is_said_in_korean_without_ids(browser, page_on_server, exported, reference, server):
    """Before: the raw English server message, with the prediction's UUID and "(invalid_input)"."""
    ranked, prediction_id = classified_on_the_page(browser, page_on_server, exported, reference)
    with PatentClassifier(server.grpc_url) as elsewhere:  # another examiner, in another window, was first
        assert elsewhere.submit_feedback(prediction_id, ranked[1].code) == "wrong"

    pick_class(browser, ranked[2])
    feedback_button(browser, "This is wrong").click()

    result = text_of(browser, ".st-key-feedback-result")
    assert result.startswith("정정을 기록하지 못했습니다. 이 결과에는 이미 정정이 기록되어 있습니다.")
    assert "This answer already has a correction" in result
    assert prediction_id not in result and "invalid_input" not in result and "PREDICTION_ID" not in result
    assert corrections_of(exported, {prediction_id}) == [(ranked[1].code, "wrong", None, ranked[0].code)]
    assert not any(feedback_button(browser, words).is_enabled() for words in ("This is right", "This is wrong"))


def test_wrong_without_a_class_picked_says_what_to_do_and_records_nothing(browser, page_on_server, exported, reference):
    _, prediction_id = classified_on_the_page(browser, page_on_server, exported, reference)

    feedback_button(browser, "This is wrong").click()

    assert text_of(browser, ".st-key-feedback-result").startswith("먼저 올바른 분류를 고른 뒤 틀림을 다시 눌러 주세요")
    assert corrections_of(exported, {prediction_id}) == []
    assert feedback_button(browser, "This is right").is_enabled()
