"""The model families the distillation tools know, as plain tables (no torch import: argument parsers use them,
and `--help` answers without loading torch)."""

STUDENT_TYPES = ("distilbert", "bert", "roberta", "gpt2")
TEACHER_TYPES = ("bert", "roberta", "gpt2")
CAUSAL_TYPES = ("gpt2",)
# A student learns from a teacher of its family (same tokenizer and objective): DistilBERT shares BERT's
# vocabulary and layer maths.
FAMILY = {"distilbert": "bert", "bert": "bert", "roberta": "roberta", "gpt2": "gpt2"}
# Students each teacher family can seed from its layers, the default first.
STUDENTS_OF = {t: tuple(s for s in STUDENT_TYPES if FAMILY[s] == t) for t in TEACHER_TYPES}
# The tokens binarization puts around a sequence, per model type: [CLS] ... [SEP] or BOS ... EOS.
TOKENIZER_TYPES = {"bert": "cls_sep", "distilbert": "cls_sep", "roberta": "cls_sep", "gpt2": "bos_eos"}
