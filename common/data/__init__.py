"""Task readers: GLUE today; SQuAD and language-modelling corpora follow the same conventions."""
