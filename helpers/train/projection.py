"""Stage 02's parts that are not the lesson (the lesson, assembling LLaVA, freezing all but the projector and the
trainer, is in notebook 02's cells): the vision-feature cache, the datasets, the held-out loss.

Because the vision tower is frozen, its features never change: they are computed once, cached in a safetensors
file and the projector trains from the cache (earlier attempts at this course ran CLIP at every step). The forward pass is
LLaVA's own: projected features are handed to ``LlavaForConditionalGeneration`` as ``mm_encoder_outputs``.
"""
from __future__ import annotations

from helpers.data.encoding import PadCollator
from helpers.data.multimodal_data import ConversationDataset
from helpers.models.vision import cache_features
from helpers.train.training import mean_target_loss, project_cached_features


def feature_table(tower, processor, records, layer: int, cache_file):
    """Cached vision features for the distinct images of `records` and a path -> row index.

    Images that cannot be decoded are left out of the index (their records are then skipped and counted by
    ``ConversationDataset``)."""
    paths = list(dict.fromkeys(str(r.image) for r in records))
    unreadable = []
    features = cache_features(tower, processor, paths, layer, cache_file, unreadable=unreadable)
    bad = set(unreadable)
    return features, {p: i for i, p in enumerate(paths) if p not in bad}


def make_dataset(records, tok, profile, features, index, spec):
    return ConversationDataset(records, tok, profile.image_seq_length, spec.max_length, features, index)


def mean_conversation_loss(model, dataset, tok, batch_size: int = 64) -> float:
    """Answer-token-weighted loss on `dataset` through the cached-feature path."""
    collate = PadCollator(tok.pad_token_id)
    batches = (collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
               for i in range(0, len(dataset), batch_size))
    return mean_target_loss(model, batches, prepare=lambda m, batch: {
        "mm_encoder_outputs": project_cached_features(m, batch.pop("vision_features"))})
