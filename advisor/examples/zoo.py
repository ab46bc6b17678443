"""An architecture zoo: small, randomly initialised models of the common families, each with its data.

Every model is built in code from its config (no download, no weights), and every data set is
made here or bundled, so each workload builds offline in seconds:

- text classification (``bert``, ``encoder``): sequences of 8 to 64 tokens (long-tailed, median
  20) over a 256-token vocabulary, right-padded with token 0 to 64; the tokens are mostly random,
  with one of four groups of 16 tokens over-represented (30% of the tokens), and the label is
  that group;
- language modelling (``gpt2``, ``llama``): sequences of 16 to 64 tokens walked along a fixed
  random first-order Markov chain, where each token has three likely successors (the likeliest
  follows 60% of the time, so next-token accuracy can approach 60%), right-padded with token 0;
  the ``labels`` are the inputs, ``-100`` at padding, unshifted (Hugging Face's convention);
  4,096 of them to train on (the text classifiers and T5 have 1,024);
- sequence to sequence (``t5``): the encoder reads 8 to 32 random tokens (padded to 32), the
  decoder writes the first 8 of them reversed (so the decoder's width, 8, is not the encoder's);
  each of the first 8 comes from its own range of 16 tokens, which makes the copy learnable;
- images (``vit``, ``resnet``): scikit-learn's bundled digits upsampled to 16x16, split 80/20.

The Hugging Face models (``bert``, ``gpt2``, ``llama``, ``t5``, ``vit``) need ``transformers``;
``resnet`` and ``encoder`` are plain PyTorch. ``MODELS`` maps each name to its build function::

    advisor run --model advisor.examples.zoo:gpt2
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import advisor
from advisor.errors import AdvisorError
from advisor.examples.digits import datasets
from advisor.workload import IGNORE

VOCAB = 256  # every text model's vocabulary; token 0 is padding (and T5's decoder start)
TEXT_WIDTH, TEXT_GROUPS, GROUP = 64, 4, 16  # the groups are tokens 4..19, 20..35, 36..51 and 52..67
TEXT_FIRST = 4  # tokens 1..3 never appear
LM_WIDTH, LM_SHORTEST = 64, 16
SEQ_WIDTH, SEQ_SHORTEST, SEQ_TARGET = 32, 8, 8
IMAGE = 16
TRAIN, VAL = 1024, 256
LM_TRAIN = 4096  # with 1,024 sequences the language models memorize them within 150 steps


def _transformers() -> ModuleType:
    try:
        import transformers
    except ImportError:
        raise AdvisorError(
            "the zoo's Hugging Face models need transformers: pip install 'advisor[zoo]' (transformers>=5,<6)"
        ) from None
    return transformers


class Samples(Dataset):
    """Rows of named, equally long tensors; each sample is one dict of them or, with ``target``,
    an ``(inputs, target)`` pair that holds the target apart."""

    def __init__(self, columns: dict[str, torch.Tensor], target: str | None = None) -> None:
        self.columns, self.target = columns, target

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int):
        sample = {key: column[i] for key, column in self.columns.items()}
        if self.target is None:
            return sample
        target = sample.pop(self.target)
        return sample, target


def _mask(lengths: np.ndarray, width: int) -> np.ndarray:
    return (np.arange(width) < lengths[:, None]).astype(np.int64)


def classes(n: int, seed: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (one per sequence) of ``n`` sequences."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(20 * np.exp(0.6 * rng.standard_normal(n))), 8, TEXT_WIDTH).astype(int)
    labels = rng.integers(0, TEXT_GROUPS, n)
    noise = rng.integers(TEXT_FIRST, VOCAB, (n, TEXT_WIDTH))
    signal = TEXT_FIRST + labels[:, None] * GROUP + rng.integers(0, GROUP, (n, TEXT_WIDTH))
    mask = _mask(lengths, TEXT_WIDTH)
    ids = np.where(rng.random((n, TEXT_WIDTH)) < 0.3, signal, noise) * mask
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}


def markov(n: int, seed: int, chain_seed: int = 1234) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (the ids, ``-100`` at padding) of ``n``
    walks along one fixed chain: from each token, its three successors follow with probability
    0.6, 0.25 and 0.1, and any token with 0.05."""
    chain = np.random.default_rng(chain_seed)
    successors = np.stack([chain.choice(np.arange(1, VOCAB), 3, replace=False) for _ in range(VOCAB)])
    rng = np.random.default_rng(seed)
    lengths = rng.integers(LM_SHORTEST, LM_WIDTH + 1, n)
    ids = np.zeros((n, LM_WIDTH), dtype=np.int64)
    ids[:, 0] = rng.integers(1, VOCAB, n)
    for t in range(1, LM_WIDTH):
        u = rng.random(n)
        pick = np.searchsorted(np.array([0.6, 0.85, 0.95]), u, side="right")  # 3 is "any token"
        likely = successors[ids[:, t - 1], np.minimum(pick, 2)]
        ids[:, t] = np.where(pick < 3, likely, rng.integers(1, VOCAB, n))
    mask = _mask(lengths, LM_WIDTH)
    ids *= mask
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(np.where(mask == 1, ids, IGNORE))}


def reversals(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Encoder ``input_ids`` and ``attention_mask``; ``labels``, the first ``SEQ_TARGET`` tokens
    reversed; ``decoder_input_ids``, the labels shifted right after start token 0.

    The token at position p < ``SEQ_TARGET`` is one of 16 kept for that position (1..16 at 0,
    17..32 at 1...), so the decoder can find what to copy by content, except where a later token
    (any of 1..255) falls in the same range: then only its position tells the two apart."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(SEQ_SHORTEST, SEQ_WIDTH + 1, n)
    mask = _mask(lengths, SEQ_WIDTH)
    ids = rng.integers(1, VOCAB, (n, SEQ_WIDTH))
    ids[:, :SEQ_TARGET] = 1 + 16 * np.arange(SEQ_TARGET) + rng.integers(0, 16, (n, SEQ_TARGET))
    ids *= mask
    labels = ids[:, :SEQ_TARGET][:, ::-1].copy()
    decoder = np.concatenate([np.zeros((n, 1), dtype=np.int64), labels[:, :-1]], axis=1)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "decoder_input_ids": torch.from_numpy(decoder), "labels": torch.from_numpy(labels)}


def digits(pixel_values: bool) -> tuple[Dataset, Dataset]:
    """(train, val) digits at ``IMAGE`` x ``IMAGE``: ``({"pixel_values": x}, label)`` pairs, or
    ``(x, label)`` with ``pixel_values=False``."""
    splits = []
    for split in datasets():
        images, labels = split.tensors
        images = F.interpolate(images, size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)
        if pixel_values:
            splits.append(Samples({"pixel_values": images.contiguous(), "labels": labels}, target="labels"))
        else:
            splits.append(TensorDataset(images.contiguous(), labels))
    return splits[0], splits[1]


def bert() -> advisor.Workload:
    """BERT (2 layers, width 128, 4 heads) classifying the token sequences; dict samples."""
    tf = _transformers()
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=TEXT_WIDTH, num_labels=TEXT_GROUPS,
                           pad_token_id=0, attn_implementation="sdpa")
    return advisor.Workload(model=tf.BertForSequenceClassification(config), train=Samples(classes(TRAIN, 0)),
                            val=Samples(classes(VAL, 1)), batch_size=32, name="zoo-bert", target="labels")


def _causal_lm(model: nn.Module, name: str) -> advisor.Workload:
    return advisor.Workload(model=model, train=Samples(markov(LM_TRAIN, 0)), val=Samples(markov(VAL, 1)),
                            batch_size=32, name=name, target="labels")


def gpt2() -> advisor.Workload:
    """GPT-2 (2 layers, width 128, 4 heads, tied LM head) predicting the Markov chain's next token."""
    tf = _transformers()
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=VOCAB, n_positions=LM_WIDTH, n_embd=128, n_layer=2, n_head=4,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                           pad_token_id=0, use_cache=False, attn_implementation="sdpa")
    return _causal_lm(tf.GPT2LMHeadModel(config), "zoo-gpt2")


def llama() -> advisor.Workload:
    """Llama (2 layers, width 128, 4 query and 2 key-value heads, untied head) on the Markov chain."""
    tf = _transformers()
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LM_WIDTH,
                            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                            use_cache=False, attn_implementation="sdpa")
    return _causal_lm(tf.LlamaForCausalLM(config), "zoo-llama")


def t5() -> advisor.Workload:
    """T5 (2 encoder and 2 decoder layers, width 128, 4 heads) writing its input's head reversed."""
    tf = _transformers()
    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2,
                         num_heads=4, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                         eos_token_id=1, use_cache=False, attn_implementation="eager")
    return advisor.Workload(model=tf.T5ForConditionalGeneration(config), train=Samples(reversals(TRAIN, 0)),
                            val=Samples(reversals(VAL, 1)), batch_size=32, name="zoo-t5", target="labels")


def vit() -> advisor.Workload:
    """ViT (16x16 digits in 4x4 patches, 2 layers, width 128, 4 heads); ``pixel_values`` dict inputs."""
    tf = _transformers()
    torch.manual_seed(0)
    config = tf.ViTConfig(image_size=IMAGE, patch_size=4, num_channels=1, hidden_size=128, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=256, num_labels=10,
                          attn_implementation="sdpa")
    train, val = digits(pixel_values=True)
    return advisor.Workload(model=tf.ViTForImageClassification(config), train=train, val=val, batch_size=64,
                            name="zoo-vit")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm around a shortcut (a 1x1 projection when the shape changes)."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, three stages of ``blocks`` basic blocks (the second and third halve the resolution),
    global average pool, linear head."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), blocks: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        stages, inputs = [], widths[0]
        for i, width in enumerate(widths):
            stage = [BasicBlock(inputs, width, stride=1 if i == 0 else 2)]
            stage += [BasicBlock(width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            inputs = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def resnet() -> advisor.Workload:
    """A ResNet (widths 32/64/128, one basic block a stage) on the 16x16 digits; tensor inputs."""
    torch.manual_seed(0)
    train, val = digits(pixel_values=False)
    return advisor.Workload(model=ResNet(), train=train, val=val, batch_size=64, name="zoo-resnet")


class EncoderClassifier(nn.Module):
    """Token and position embeddings, ``nn.TransformerEncoder`` with padding masked as keys, mean over
    the tokens, linear head."""

    def __init__(self, width: int = 128, depth: int = 2, heads: int = 4, classes: int = TEXT_GROUPS) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Embedding(TEXT_WIDTH, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=256, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.encoder(self.embed(input_ids) + self.position(positions),
                         src_key_padding_mask=attention_mask == 0)
        weights = attention_mask.unsqueeze(-1).to(x.dtype)
        return self.head((x * weights).sum(1) / weights.sum(1).clamp(min=1))


def encoder() -> advisor.Workload:
    """``nn.TransformerEncoder`` (2 layers, width 128, 4 heads) classifying the token sequences;
    ``({"input_ids", "attention_mask"}, label)`` pairs."""
    torch.manual_seed(0)
    return advisor.Workload(model=EncoderClassifier(), train=Samples(classes(TRAIN, 0), target="labels"),
                            val=Samples(classes(VAL, 1), target="labels"), batch_size=32, name="zoo-encoder")


MODELS: dict[str, Callable[[], advisor.Workload]] = {
    "bert": bert, "gpt2": gpt2, "llama": llama, "t5": t5, "vit": vit, "resnet": resnet, "encoder": encoder,
}
