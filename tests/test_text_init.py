"""LSA warm start of the token table: words of one topic end up close, words of different topics
apart, unseen tokens keep their initialization, and documents are the distinct texts per tower."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from multitower_jax import features as F
from multitower_jax.data.tokenizer import HashTokenizer
from multitower_jax.train import text_init

VOCAB = 200


def ids(words: str) -> np.ndarray:
    tokens, _ = HashTokenizer(VOCAB, 16).tokenize(words)
    return tokens[tokens > 1]


def two_topic_documents(seed: int = 0) -> list[np.ndarray]:
    """Documents drawing 3 words each from one of two disjoint topics' vocabularies."""
    rng = np.random.default_rng(seed)
    topics = (["apple", "pear", "plum", "fig", "grape"], ["drill", "saw", "hammer", "wrench", "nail"])
    return [ids(" ".join(rng.choice(topics[i % 2], 3, replace=False))) for i in range(200)]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_lsa_puts_words_of_one_topic_together_and_topics_apart():
    table, seen = text_init.lsa_token_table(two_topic_documents(), VOCAB, dim=2)
    apple, pear, drill, saw = (ids(w)[0] for w in ("apple", "pear", "drill", "saw"))
    assert seen[[apple, pear, drill, saw]].all()
    assert seen.sum() == len({int(t) for d in two_topic_documents() for t in d})
    assert cosine(table[apple], table[pear]) > 0.9
    assert cosine(table[drill], table[saw]) > 0.9
    assert abs(cosine(table[apple], table[drill])) < 0.3
    np.testing.assert_allclose(np.linalg.norm(table[seen], axis=1), 1.0, rtol=1e-5)
    assert not table[~seen].any()


def test_warm_start_replaces_only_the_rows_of_seen_tokens():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(VOCAB + 8, 2)).astype(np.float32)  # 8 padding rows, as for sharding
    lsa, seen = text_init.lsa_token_table(two_topic_documents(), VOCAB, dim=2)
    out = np.asarray(text_init.warm_start(jnp.asarray(table), lsa, seen))
    np.testing.assert_array_equal(out[:VOCAB][seen], lsa[seen])
    np.testing.assert_array_equal(out[:VOCAB][~seen], table[:VOCAB][~seen])
    np.testing.assert_array_equal(out[VOCAB:], table[VOCAB:])


def test_too_few_texts_is_a_clear_error():
    with pytest.raises(ValueError, match="distinct texts"):
        text_init.lsa_token_table([ids("apple")], VOCAB, dim=2)


def test_documents_are_the_distinct_texts_of_each_tower_joined_per_row():
    towers = {
        "ad": F.TowerSpec("ad", (F.Text("description", 4, VOCAB), F.Text("title", 2, VOCAB))),
        "context": F.TowerSpec("context_search", (F.Text("query", 3, VOCAB),)),
        "user": F.TowerSpec("user", (F.Categorical("age", 10, 4),)),
    }
    block = {"ad.title": np.array(["apple pear", "apple pear", "saw"], object),
             "ad.description": np.array(["fig", "fig", "drill nail"], object),
             "context.query": np.array(["plum", "plum", "plum"], object),
             "user.age": np.zeros(3, np.int64)}
    documents = text_init.tower_documents([block], towers)
    expected = [np.concatenate([ids("fig"), ids("apple pear")]), np.concatenate([ids("drill nail"), ids("saw")]),
                ids("plum")]  # per tower (in spec order), its distinct texts in row order
    assert len(documents) == len(expected)
    for got, want in zip(documents, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("model_axis", [1, 8])
def test_trainer_starts_the_token_table_from_lsa_of_the_train_texts(synthetic_dir, tmp_path, model_axis):
    """On a tiny world: the token table's rows of words in the train texts are the LSA vectors
    (norm 1 with "unit" init), the rest keep the random init; also with the table row-sharded."""
    from multitower_jax.data import pipeline
    from multitower_jax.train import trainer as trainer_lib
    from tests.conftest import synthetic_config

    overrides = ["--config.model.embed_init=unit", f"--config.mesh.model={model_axis}",
                 f"--config.model.vocab_multiple={model_axis}"]
    if model_axis > 1:
        overrides.append("--config.sharding.rules=(('vocab','model'),('embed',None),('embed_in',None),"
                         "('mlp',None),('heads',None),('kv',None),('pos',None))")
    random = trainer_lib.Trainer(synthetic_config(synthetic_dir, *overrides), tmp_path / "random")
    warm = trainer_lib.Trainer(synthetic_config(synthetic_dir, "--config.model.text.init=lsa", *overrides),
                               tmp_path / "lsa")
    table0 = np.asarray(random.init_state()["params"]["text_encoder"]["token_embed"]["embedding"])
    table = np.asarray(warm.init_state()["params"]["text_encoder"]["token_embed"]["embedding"])
    config = warm.config
    documents = text_init.tower_documents(pipeline.raw_blocks(pipeline.data_source(config, "search", "train")),
                                          warm.spec.towers("search"))
    vocab = config.features.ad.title.vocab_size
    lsa, seen = text_init.lsa_token_table(documents, vocab, table.shape[1], int(config.seed))
    assert seen.sum() > 100
    np.testing.assert_allclose(table[:vocab][seen], lsa[seen], atol=1e-6)
    np.testing.assert_array_equal(table[:vocab][~seen], table0[:vocab][~seen])
