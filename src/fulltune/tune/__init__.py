"""`fulltune tune`: the hyperparameter search (its space, its trials as child `train` processes, the Optuna study
and its results)."""
