"""The classifier a run trains as a standard HF model. `imdb-export` copies this file into the exported folder, where
AutoModelForSequenceClassification and pipeline() load it (trust_remote_code=True) with only torch and transformers."""

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel, TextClassificationPipeline
from transformers.modeling_outputs import SequenceClassifierOutput


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """One vector per review: the first token's (`cls`), or the mean over its real tokens (`mean`)."""
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def head_tokens(budget: int) -> int:
    """head_tail's share from the start: a quarter of the budget, rounded half up (510 -> 128)."""
    return (budget + 2) // 4


def keep_ends(texts: list[str], spans: list, budget: int, truncation: str) -> list[str]:
    """Cut reviews longer than `budget` tokens to their last `budget` tokens (`tail`), or their first quarter and last
    three quarters (`head_tail`, Sun et al. 2019: reviews often end with the verdict), at offsets `spans`."""
    head = head_tokens(budget) if truncation == "head_tail" else 0
    cut = []
    for text, offsets in zip(texts, spans):
        if len(offsets) > budget:
            start = offsets[len(offsets) - (budget - head)][0]
            text = (text[:offsets[head - 1][1]] + " " if head else "") + text[start:]
        cut.append(text)
    return cut


class SentimentHead(nn.Module):
    def __init__(self, hidden_size: int, pooling: str, dropout: float, num_labels: int = 2):
        super().__init__()
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.classify(pool(hidden, attention_mask, self.pooling))

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(pooled))


def without_pooler(encoder: nn.Module) -> nn.Module:
    """BERT's pretrained pooler is not part of this head; unused parameters would also break DDP."""
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


def takes_token_type_ids(encoder: nn.Module) -> bool:
    """Decided from the encoder's forward, not its name: ModernBERT silently swallows token_type_ids."""
    return "token_type_ids" in inspect.signature(encoder.forward).parameters


class IMDBSentimentConfig(PreTrainedConfig):
    """The encoder's config (a sub-config) and the head's: pooling, dropout, and how training cut long reviews."""

    model_type = "imdb_sentiment"
    sub_configs = {"encoder_config": AutoConfig}

    def __init__(self, encoder_config=None, pooling: str = "mean", classifier_dropout: float = 0.1,
                 truncation: str = "head", review_max_length: int = 512, **kwargs):
        if isinstance(encoder_config, dict):
            encoder_config = AutoConfig.for_model(**encoder_config)
        self.encoder_config = encoder_config
        self.pooling, self.classifier_dropout = pooling, classifier_dropout
        self.truncation, self.review_max_length = truncation, review_max_length
        super().__init__(**kwargs)


class IMDBSentimentClassifier(PreTrainedModel):
    config_class = IMDBSentimentConfig
    base_model_prefix = "imdb_sentiment"
    _supports_sdpa = True

    def __init__(self, config: IMDBSentimentConfig):
        super().__init__(config)
        self.encoder = without_pooler(AutoModel.from_config(config.encoder_config))
        self.head = SentimentHead(config.encoder_config.hidden_size, config.pooling, config.classifier_dropout,
                                  config.num_labels)
        self.takes_token_type_ids = takes_token_type_ids(self.encoder)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        extra = {"token_type_ids": token_type_ids} if self.takes_token_type_ids and token_type_ids is not None else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        logits = self.head(hidden, attention_mask)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class IMDBSentimentPipeline(TextClassificationPipeline):
    """text-classification that cuts long reviews as in training (config.truncation), beyond a tokenizer's means."""

    def preprocess(self, inputs, **tokenizer_kwargs):
        tokenizer_kwargs = {"truncation": True, "max_length": self.model.config.review_max_length, **tokenizer_kwargs}
        if not isinstance(inputs, str) or self.model.config.truncation == "head":
            return super().preprocess(inputs, **tokenizer_kwargs)
        spans = self.tokenizer([inputs], add_special_tokens=False, return_offsets_mapping=True,
                               verbose=False)["offset_mapping"]
        budget = self.model.config.review_max_length - self.tokenizer.num_special_tokens_to_add()
        inputs = keep_ends([inputs], spans, budget, self.model.config.truncation)[0]
        side, self.tokenizer.truncation_side = self.tokenizer.truncation_side, "right"  # as in training, after the cut
        try:
            return super().preprocess(inputs, **tokenizer_kwargs)
        finally:
            self.tokenizer.truncation_side = side
