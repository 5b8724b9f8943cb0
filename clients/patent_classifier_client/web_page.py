"""The web page to try one patent: choose a model, type the patent's IPC codes, title, abstract
and claims, see its most likely classes, and, when the server records predictions, say whether
the top class is right or pick the right one (an examiner's correction, docs/feedback.md). For
examiners, not programmers: every word on the page is Korean first, English second. It calls the
classifier server through the client library, like any other client, and never loads a model itself.

Started by ``python -m patent_classifier_client web`` (``make web``), which runs it with Streamlit as

    streamlit run clients/patent_classifier_client/web_page.py -- --url 127.0.0.1:8001 --protocol grpc --model kscst-gemma2
"""
from __future__ import annotations

import argparse
import re
import sys

import streamlit as st

from patent_classifier_client.patent_classifier import DEFAULT_MODEL, DEFAULT_URLS, PatentClassifier
from patent_classifier_client import access_token
from patent_classifier_client.errors import AccessDenied, InvalidInput, ServerUnavailable, ServingError
from patent_classifier_client.feedback_protocol import EXAMINER_ID, FEEDBACK_MODEL, MAX_CHARACTERS
from patent_classifier_client.protocol import Classification

TOP_K = 5
# The form's fields, by the name the server's errors use for them.
FIELD_LABELS = {
    "ipc": "IPC 코드 · IPC codes (선택 · optional)",
    "title": "발명의 명칭 · Title",
    "abstract": "요약 · Abstract",
    "claims": "청구범위 · Claims (한 줄에 하나씩 · one per line)",
}
_DOCUMENT_FIELD = re.compile(r"DOCUMENT\[\d+\](?:\.(\w+))?")
# The server's words for what is wrong with a field (clients/patent_classifier_client/patent_document.py), in Korean.
_PROBLEMS_IN_KOREAN = (
    ("holds none of title, abstract, claims", "발명의 명칭, 요약, 청구범위 가운데 하나 이상을 입력해 주세요"),
    ("bytes; the limit is", "너무 깁니다"),
)
# Why the feedback model refused a correction (core/prediction_store.py, clients/patent_classifier_client/feedback_protocol.py), as
# an examiner reads it: Korean, then English, without the prediction's id or the error's kind. The
# first two mean the answer is corrected already, so the page's controls for it no longer apply.
_ALREADY_CORRECTED = ("already has a correction", "corrected by another request")
_CORRECTION_PROBLEMS = (
    (_ALREADY_CORRECTED, "이 결과에는 이미 정정이 기록되어 있습니다. 한 결과에는 정정을 한 번만 기록할 수 있습니다",
     "This answer already has a correction; an answer takes one correction."),
    (("no recorded prediction has the id",), "이 결과는 기록에 없습니다. 특허를 다시 분류한 뒤 기록해 주세요",
     "This answer is not in the records; classify the patent again, then record."),
    (("is not a class of model",), "고른 분류는 이 모델의 분류가 아닙니다", "The class picked is not one of this model's classes."),
    ((EXAMINER_ID,), f"심사관 ID는 {MAX_CHARACTERS[EXAMINER_ID]}자까지입니다",
     f"The examiner id is too long (at most {MAX_CHARACTERS[EXAMINER_ID]} characters)."),
)
# How long the page trusts what it learnt of the server (its models, a model's classes).
SERVER_FACTS_TTL_S = 60


def page_settings(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="web_page.py")
    parser.add_argument("--url", default=DEFAULT_URLS["grpc"])
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--tls-ca", default=None)
    settings = parser.parse_args(argv)
    settings.token = access_token.read_token(None)  # from the environment `python -m patent_classifier_client web` set
    return settings


def connect(settings: argparse.Namespace, model: str) -> PatentClassifier:
    return PatentClassifier(settings.url, settings.protocol, model, settings.timeout,
                            tls=settings.tls, tls_ca=settings.tls_ca, token=settings.token)


# Errors are not cached (Streamlit caches only what returns), so a server that comes back is seen at once.
@st.cache_data(ttl=SERVER_FACTS_TTL_S, show_spinner=False)
def ready_models(_settings: argparse.Namespace, url: str) -> list[str]:
    """The models the server has loaded (raises the client's typed errors)."""
    with connect(_settings, DEFAULT_MODEL) as classifier:
        return classifier.ready_models()


@st.cache_data(ttl=SERVER_FACTS_TTL_S, show_spinner=False)
def model_classes(_settings: argparse.Namespace, url: str, model: str) -> dict[str, str] | None:
    """The model's classes, code → name; None when its configuration does not say."""
    with connect(_settings, model) as classifier:
        return classifier.model_labels()


def server_down_message(settings: argparse.Namespace) -> str:
    return (
        "**분류 서버에 연결할 수 없습니다.** 잠시 후 다시 시도해 주세요. 계속 안 되면 시스템 담당자에게 "
        f"이 주소를 알려 주세요: `{settings.url}` ({settings.protocol})\n\n"
        "**The classifier server cannot be reached.** Please try again in a moment; if it keeps failing, "
        f"tell the system administrator this address: `{settings.url}` ({settings.protocol})."
    )


def access_denied_message() -> str:
    return ("**서버가 접근 토큰을 요구합니다.** 시스템 담당자에게 알려 주세요 · **The server requires an access "
            f"token.** Start this page with `--token-file` (or `${access_token.TOKEN_ENV}` set), as for the other clients.")


def caption(model: str, classes: dict[str, str] | None, top_k: int) -> str:
    if not classes:
        return f"모델 `{model}` · 가장 가능성 높은 분류 {top_k}개 · the {top_k} most likely classes"
    first = min(classes)
    return (
        f"모델 `{model}` · 분류 {len(classes)}개 가운데 가장 가능성 높은 {top_k}개 (예: {first} {classes[first]}) · "
        f"the {top_k} most likely of its {len(classes)} classes"
    )


def form_error_message(error: InvalidInput) -> str:
    """The server names fields as ``DOCUMENT[0].title``; say which box of the form to fix."""
    match = _DOCUMENT_FIELD.match(error.field)
    field = match.group(1) if match else None
    box = FIELD_LABELS.get(field, field) if field else "특허 내용 · the patent"
    korean = next((words for sign, words in _PROBLEMS_IN_KOREAN if sign in error.problem), "입력을 확인해 주세요")
    return f"**{box}** 칸을 확인해 주세요: {korean}.\n\nPlease check **{box}**: {error.problem}"


def show_answer(answer: Classification) -> None:
    top = answer.labels[0]
    with st.container(key="top-class"):
        st.success(f"가장 가능성 높은 분류 · Top class: **{top.code}** · {top.name} — {top.probability:.1%}")
    with st.container(key="classes"):
        for rank, score in enumerate(answer.labels, start=1):
            st.progress(min(1.0, max(0.0, score.probability)), text=f"{rank}. **{score.code}** · {score.name} — {score.probability:.1%}")
    with st.container(key="tokens"):
        truncation = (
            "예: 특허가 모델이 읽는 길이보다 길어 뒷부분은 쓰이지 않았습니다 · yes: the rest was not read"
            if answer.truncated
            else "아니오: 특허 전체를 읽었습니다 · no: the model read the whole patent"
        )
        st.markdown(f"읽은 토큰 · Tokens read: **{answer.token_count}** · 잘림 · Truncated: **{truncation}**")


def correction_refused_message(error: InvalidInput) -> tuple[str, bool]:
    """What the page says when the server refused a correction, and whether the answer is corrected already."""
    said = f"{error.field}: {error.problem}"
    for signs, korean, english in _CORRECTION_PROBLEMS:
        if any(sign in said for sign in signs):
            return f"**정정을 기록하지 못했습니다.** {korean}. · The correction was not recorded. {english}", signs is _ALREADY_CORRECTED
    return ("**정정을 기록하지 못했습니다.** 시스템 담당자에게 알려 주세요. · The correction was not recorded; please tell the "
            "system administrator.", False)


def show_feedback_controls(classifier: PatentClassifier, answer: Classification, classes: dict[str, str] | None,
                           settings: argparse.Namespace) -> None:
    """"This is right", or "this is wrong" with the right class picked among all the model's classes: one
    form with everything a correction needs, so a click sends what the examiner typed. Once the answer has
    its correction (recorded here or elsewhere) the form stays, disabled, with what happened."""
    top = answer.labels[0]
    settled = st.session_state.setdefault("settled", {}).get(answer.prediction_id)  # (message, recorded?) once final
    options = list((classes or {score.code: score.name for score in answer.labels}).items())
    st.markdown(f"**{top.code}이(가) 이 특허의 올바른 분류입니까?** 답은 모델의 기록에 남습니다 · "
                f"**Is {top.code} the right class for this patent?** Your answer goes to the model's records.")
    with st.form("correction"):
        examiner = st.text_input("심사관 ID · Examiner id (선택 · optional)", key="examiner-id", disabled=settled is not None)
        confirmed = st.form_submit_button(f"맞음 · This is right ({top.code})", key="confirm", disabled=settled is not None)
        picked = st.selectbox(
            "올바른 분류 · The right class", options, index=None, key="right-class", disabled=settled is not None,
            format_func=lambda entry: f"{entry[0]} · {entry[1]}", placeholder="올바른 분류를 고르세요 · Pick the right class …",
        )
        corrected = st.form_submit_button("틀림 · This is wrong: 고른 분류로 기록 · record the class picked", key="correct",
                                          disabled=settled is not None)
    with st.container(key="feedback-result"):
        if settled is not None:
            message, recorded = settled
            (st.success if recorded else st.warning)(message)
            return
        if not (confirmed or corrected):
            return
        if corrected and picked is None:
            st.warning("먼저 올바른 분류를 고른 뒤 **틀림**을 다시 눌러 주세요 · Pick the right class first, then press **This is wrong** again.")
            return
        label = top.code if confirmed else picked[0]
        try:
            verdict = classifier.submit_feedback(answer.prediction_id, label, examiner_id=examiner.strip() or None)
        except InvalidInput as error:
            message, corrected_already = correction_refused_message(error)
            if not corrected_already:
                st.warning(message)
                return
            st.session_state["settled"][answer.prediction_id] = (message, False)
        except ServerUnavailable:
            st.error(server_down_message(settings))
            return
        except AccessDenied:
            st.error(access_denied_message())
            return
        except ServingError:
            st.error("**정정을 기록하지 못했습니다.** 잠시 후 다시 시도해 주세요. · The correction was not recorded; please try "
                     "again in a moment.")
            return
        else:
            st.session_state["settled"][answer.prediction_id] = (
                f"기록했습니다: 이 특허의 올바른 분류는 **{label}** (모델 {'맞음' if verdict == 'correct' else '틀림'}) · "
                f"Recorded: **{label}** is right for this patent (the model was **{verdict}**).", True)
    st.rerun()  # drawn again with the form disabled and what happened below it


def patent_form() -> dict | None:
    """The typed patent; None until the button is pressed."""
    with st.form("patent"):
        ipc = st.text_input(FIELD_LABELS["ipc"], key="ipc", placeholder="G06F 16/35; G06N 3/08")
        title = st.text_input(FIELD_LABELS["title"], key="title")
        abstract = st.text_area(FIELD_LABELS["abstract"], key="abstract", height=140)
        claims = st.text_area(FIELD_LABELS["claims"], key="claims", height=180, placeholder="1. …\n2. 제1항에 있어서, …")
        submitted = st.form_submit_button("분류하기 · Classify", type="primary")
    if not submitted:
        return None
    # Boxes left empty are absent fields, and blank claim lines no claims (clients/patent_classifier_client/patent_document.py's rules).
    return {"ipc": ipc, "title": title, "abstract": abstract, "claims": claims.splitlines()}


def main() -> None:
    settings = page_settings(sys.argv[1:])
    st.set_page_config(page_title="특허 분류 · Patent classifier", page_icon="📄")
    st.title("특허 분류 · Patent classifier")

    try:
        models = ready_models(settings, settings.url)
    except ServingError:
        models = []
    with st.container(key="server-status"):
        if not models:
            st.error(server_down_message(settings))
    choices = sorted((set(models) - {FEEDBACK_MODEL}) | {settings.model})  # the feedback model classifies nothing
    model = st.selectbox("모델 · Model", choices, index=choices.index(settings.model), key="model")
    try:
        classes = model_classes(settings, settings.url, model) if models else None
    except ServingError:
        classes = None
    top_k = min(TOP_K, len(classes)) if classes else TOP_K
    with st.container(key="caption"):
        st.caption(caption(model, classes, top_k))

    document = patent_form()
    with st.container(key="answer"):
        if document is not None:  # a connection only when there is a patent to send, not on every rerun
            st.session_state.pop("answer", None)
            st.session_state.pop("right-class", None)  # a class picked for the last answer is not one for this
            with connect(settings, model) as classifier:
                classify(classifier, document, top_k, settings)
        # Kept across the reruns the correction controls cause, for the model that gave it.
        answered_model, answer = st.session_state.get("answer", (None, None))
        if answer is not None and answered_model == model:
            show_answer(answer)
    if answer is not None and answered_model == model and FEEDBACK_MODEL in models:
        with st.container(key="feedback"), connect(settings, model) as classifier:
            show_feedback_controls(classifier, answer, classes, settings)


def classify(classifier: PatentClassifier, document: dict, top_k: int, settings: argparse.Namespace) -> None:
    try:
        with st.spinner("분류하는 중 · Classifying …"):
            st.session_state["answer"] = (classifier.model, classifier.classify(document, top_k=top_k))
    except ServerUnavailable:
        st.error(server_down_message(settings))
    except AccessDenied:
        st.error(access_denied_message())
    except InvalidInput as error:
        st.warning(form_error_message(error))
    except ServingError as error:
        st.error(f"**이 특허를 분류하지 못했습니다** ({error.kind.value}) · The server could not classify this patent: {error.message}")


main()
