"""Deterministic Korean patent documents for demos, tests, the export's merge proof and benchmarks.

No patent data set can be downloaded here, so documents are assembled from patent-style
sentence templates, technical vocabulary, IPC codes and, when ``konlpy`` is installed, real
Korean legal prose from the National Assembly bills it ships as package data. The same seed
always gives the same documents.
"""
from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

from patent_classifier_client.patent_document import PatentDocument

_SUBJECTS = [
    "반도체 소자", "이차전지", "연료전지", "영상 처리 장치", "자율주행 차량", "무선 통신 단말", "의료 영상 장치",
    "유기 발광 다이오드", "인공지능 모델", "데이터베이스 서버", "블록체인 네트워크", "태양광 모듈", "수소 저장 합금",
    "유전자 편집 시스템", "항체 단백질", "나노 입자", "고분자 복합재", "열교환기", "풍력 발전기", "스마트 팩토리",
    "드론 제어기", "음성 인식 엔진", "배터리 관리 시스템", "광학 렌즈 모듈", "전력 변환 회로", "비파괴 검사 장치",
    "식물 재배 장치", "정수 필터", "로봇 그리퍼", "특허 문서 분류기",
]
_PARTS = [
    "기판", "전극", "센서부", "제어부", "통신부", "저장부", "프로세서", "하우징", "냉각 유로", "분리막", "촉매층",
    "신경망 계층", "임베딩 벡터", "광원", "구동 모터", "압력 센서", "필터 부재", "절연층", "안테나 어레이", "메모리 셀",
]
_ACTIONS = [
    "을 측정하는", "을 제어하는", "을 생성하는", "을 분류하는", "을 저장하는", "을 전송하는", "을 냉각하는",
    "을 증폭하는", "을 보정하는", "을 학습하는", "을 검출하는", "을 변환하는",
]
_RESULTS = [
    "처리 속도가 향상된다", "전력 소모가 감소한다", "수명이 연장된다", "정확도가 개선된다", "제조 비용이 절감된다",
    "안정성이 확보된다", "신뢰성이 높아진다", "발열이 억제된다", "분류 성능이 향상된다", "응답 지연이 줄어든다",
]
_LATIN_TERMS = ["CNN", "LSTM", "Transformer", "GaN", "LiFePO4", "OLED", "5G NR", "IoT", "API", "GPU", "FPGA", "PCB"]
_FALLBACK_PROSE = [
    "이 법은 국민의 안전과 복리 증진에 이바지함을 목적으로 한다.",
    "국가와 지방자치단체는 관련 시책을 수립하고 시행하여야 한다.",
    "위원회는 위원장 1명을 포함한 15명 이내의 위원으로 구성한다.",
    "제1항에 따른 신고의 절차와 방법은 대통령령으로 정한다.",
]


@lru_cache(maxsize=1)
def korean_prose() -> tuple[str, ...]:
    """Sentences of real Korean legal text from konlpy's bundled corpus (or a small fallback)."""
    try:
        import konlpy
    except ImportError:
        return tuple(_FALLBACK_PROSE)
    corpus = Path(konlpy.__file__).parent / "data" / "corpus"
    sentences: list[str] = []
    for path in sorted(corpus.glob("*/*.txt")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        for line in text.splitlines():
            for sentence in line.replace("다. ", "다.\n").splitlines():
                sentence = " ".join(sentence.split())
                if 20 <= len(sentence) <= 200:
                    sentences.append(sentence)
    return tuple(sentences) or tuple(_FALLBACK_PROSE)


def ipc_code(rng: random.Random) -> str:
    section = rng.choice("ABCDEFGH")
    return f"{section}{rng.randint(1, 99):02d}{rng.choice('BCDFGHJKLMNPQ')} {rng.randint(1, 99)}/{rng.randint(0, 999):02d}"


def _technical_sentence(rng: random.Random) -> str:
    subject, part = rng.choice(_SUBJECTS), rng.choice(_PARTS)
    return (
        f"본 발명에 따른 {subject}는 {part}{rng.choice(_ACTIONS)} {rng.choice(_PARTS)}를 포함하며, "
        f"{rng.choice(_LATIN_TERMS)} 기반의 {rng.randint(2, 512)}개 채널을 이용하여 {rng.choice(_RESULTS)}."
    )


def _sentences(rng: random.Random, count: int) -> str:
    prose = korean_prose()
    return " ".join(_technical_sentence(rng) if rng.random() < 0.6 else rng.choice(prose) for _ in range(count))


def synthetic_patent(rng: random.Random, long: bool) -> PatentDocument:
    """One patent; ``long`` ones run well past 512 tokens, short ones stay well below."""
    subject = rng.choice(_SUBJECTS)
    claim_count = rng.randint(14, 24) if long else rng.randint(1, 3)
    claims = [f"1. {rng.choice(_PARTS)}와 {rng.choice(_PARTS)}를 포함하는 {subject}로서, {_sentences(rng, 2)}"]
    for number in range(2, claim_count + 1):
        claims.append(f"{number}. 제{rng.randint(1, number - 1)}항에 있어서, {_sentences(rng, rng.randint(1, 3))}")
    return PatentDocument(
        ipc=[ipc_code(rng) for _ in range(rng.randint(1, 3))],
        title=f"{rng.choice(_PARTS)}{rng.choice(_ACTIONS)} {subject} 및 그 제조 방법",
        abstract=_sentences(rng, rng.randint(8, 14) if long else rng.randint(1, 3)),
        claims=claims,
    )


def synthetic_patents(count: int, seed: int = 0, long_share: float = 0.7) -> list[PatentDocument]:
    """``count`` patents; about ``long_share`` of them reach the 512-token cap, as most real patents do."""
    rng = random.Random(seed)
    return [synthetic_patent(rng, long=rng.random() < long_share) for _ in range(count)]
