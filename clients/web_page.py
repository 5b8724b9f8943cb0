"""The web page to try one patent: type its IPC codes, title, abstract and claims, see the five
most likely classes. For people who are not programmers; it calls the classifier server through
the client library, like any other client, and never loads the model itself.

Started by ``python -m clients web`` (``make web``), which runs it with Streamlit as

    streamlit run clients/web_page.py -- --url 127.0.0.1:8001 --protocol grpc --model kscst-gemma2
"""
from __future__ import annotations

import argparse
import re
import sys

import streamlit as st

from clients.patent_classifier import DEFAULT_MODEL, DEFAULT_URLS, PatentClassifier
from core import access_token
from core.errors import AccessDenied, InvalidInput, ServerUnavailable, ServingError
from core.protocol import Classification

TOP_K = 5
# The form's fields, by the name the server's errors use for them.
FIELD_LABELS = {
    "ipc": "IPC 코드 (IPC codes)",
    "title": "발명의 명칭 (title)",
    "abstract": "요약 (abstract)",
    "claims": "청구범위 (claims, one per line)",
}
_DOCUMENT_FIELD = re.compile(r"DOCUMENT\[\d+\]\.(\w+)")


def page_settings(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="web_page.py")
    parser.add_argument("--url", default=DEFAULT_URLS["grpc"])
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--tls-ca", default=None)
    settings = parser.parse_args(argv)
    settings.token = access_token.read_token(None)  # from the environment `python -m clients web` set
    return settings


def server_down_message(settings: argparse.Namespace) -> str:
    return (
        f"**The classifier server is not reachable** at `{settings.url}` ({settings.protocol}, model "
        f"`{settings.model}`). Start it with `make serve`, or start this page against a running server "
        "(`make web GRPC_PORT=…`), then try again."
    )


def form_error_message(error: InvalidInput) -> str:
    """The server names fields as ``DOCUMENT[0].title``; say which box of the form to fix."""
    match = _DOCUMENT_FIELD.match(error.field)
    box = FIELD_LABELS.get(match.group(1), match.group(1)) if match else error.field
    return f"Please check **{box}**: {error.problem}"


def show_answer(answer: Classification) -> None:
    top = answer.labels[0]
    with st.container(key="top-class"):
        st.success(f"Top class: **{top.code}** · {top.name} — {top.probability:.1%}")
    with st.container(key="classes"):
        for rank, score in enumerate(answer.labels, start=1):
            st.progress(min(1.0, max(0.0, score.probability)), text=f"{rank}. **{score.code}** · {score.name} — {score.probability:.1%}")
    with st.container(key="tokens"):
        truncation = (
            "yes: the patent is longer than the model reads, and the rest was not used"
            if answer.truncated
            else "no: the model read the whole patent"
        )
        st.markdown(f"Tokens read: **{answer.token_count}** · Truncated: **{truncation}**")


def main() -> None:
    settings = page_settings(sys.argv[1:])
    st.set_page_config(page_title="Patent classifier", page_icon="📄")
    st.title("특허 분류 · Patent classifier")
    st.caption(f"Model `{settings.model}` on {settings.protocol} `{settings.url}` · top {TOP_K} of the KSCST classes")

    with PatentClassifier(settings.url, settings.protocol, settings.model, settings.timeout,
                          tls=settings.tls, tls_ca=settings.tls_ca, token=settings.token) as classifier:
        with st.container(key="server-status"):
            if not classifier.is_ready():
                st.error(server_down_message(settings))

        with st.form("patent"):
            ipc = st.text_input(FIELD_LABELS["ipc"], key="ipc", placeholder="G06F 16/35; G06N 3/08")
            title = st.text_input(FIELD_LABELS["title"], key="title")
            abstract = st.text_area(FIELD_LABELS["abstract"], key="abstract", height=140)
            claims = st.text_area(FIELD_LABELS["claims"], key="claims", height=180, placeholder="1. …\n2. 제1항에 있어서, …")
            submitted = st.form_submit_button("분류 (Classify)", type="primary")
        if not submitted:
            return

        document = {
            "ipc": ipc,
            "title": title,
            "abstract": abstract,
            "claims": [line.strip() for line in claims.splitlines() if line.strip()],
        }
        with st.container(key="answer"):
            try:
                with st.spinner("Classifying …"):
                    answer = classifier.classify(document, top_k=TOP_K)
            except ServerUnavailable:
                st.error(server_down_message(settings))
            except AccessDenied:
                st.error("**The server requires an access token.** Start this page with `--token-file` "
                         f"(or `${access_token.TOKEN_ENV}` set), as for the other clients.")
            except InvalidInput as error:
                st.warning(form_error_message(error))
            except ServingError as error:
                st.error(f"The server could not classify this patent ({error.kind.value}): {error.message}")
            else:
                show_answer(answer)


main()
