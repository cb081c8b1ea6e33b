"""The text-classification pipeline of an exported remote-code folder (`custom_pipelines` in its config.json):
stock `TextClassificationPipeline`, told that the shipped classes are sequence classifiers.

The stock pipeline checks the model's class name against the library's own table of sequence classifiers
(`MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES`), which no remote-code class is in, and logs an error
naming ~150 classes although everything works. This subclass adds the shipped classes to that table for its
check, so `pipeline("text-classification", model=folder, trust_remote_code=True)` loads without the error,
and a model of any other class is still reported. Self-contained: torch and transformers only."""

from __future__ import annotations

from transformers import TextClassificationPipeline

# The classes an exported folder's `auto_map` may name (transformers_ext/export.py).
SHIPPED_CLASSES = ("FlexBertForSequenceClassification", "RoutedFlexBertForSequenceClassification")


class FlexBertTextClassificationPipeline(TextClassificationPipeline):
    """`TextClassificationPipeline` whose model-class check also accepts the shipped classes."""

    def check_model_type(self, supported_models: list[str] | dict) -> None:
        if isinstance(supported_models, list):
            supported_models = [*supported_models, *SHIPPED_CLASSES]
        else:
            supported_models = {**supported_models, "flexbert": SHIPPED_CLASSES}
        super().check_model_type(supported_models)
