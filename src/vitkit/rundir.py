"""The names of the files in a model directory and in a training run's directory (a run
directory is a model directory with its training beside it). Every module that reads or writes
these files takes the names from here.

    config.json  model.safetensors  labels.json  calibration.safetensors    the model
    text_config.json  text.safetensors  tokenizer.json          a CLIP's text tower
    train.json   metrics.jsonl      loss.png     accuracy.png               the run
    skipped.txt                                    unreadable files a streamed run passed over
    best/                                          the best model so far (a model directory)
    checkpoints/ last.json  step-<N>/ (state.json + safetensors)  step-<N>.partial/
    eval/        eval.json  confusion.png          written by `vitkit eval`
    model.onnx                                     written by `vitkit export`
"""

# -- a model ---------------------------------------------------------------------------
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LABELS_FILE = "labels.json"
# Sample training images that int8 inference calibrates on.
CALIBRATION_FILE = "calibration.safetensors"
# A CLIP is its image tower's model directory with the text tower beside it: its config, its
# weights (with the logit scale), and the tokenizer that turns text into its ids.
TEXT_CONFIG_FILE = "text_config.json"
TEXT_WEIGHTS_FILE = "text.safetensors"
TOKENIZER_FILE = "tokenizer.json"

# -- a training run ----------------------------------------------------------------------
TRAIN_CONFIG_FILE = "train.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
ACCURACY_PLOT = "accuracy.png"
BEST_DIR = "best"
SKIPPED_FILE = "skipped.txt"

# -- its training state (see train/checkpoint.py) -----------------------------------------
CHECKPOINTS = "checkpoints"
POINTER_FILE = "last.json"
STATE_JSON = "state.json"
STATE_PREFIX = "step-"
PARTIAL_SUFFIX = ".partial"
# Earlier vitkit versions kept a pickle here; it is never loaded.
LEGACY_STATE_FILE = "last.pt"

# -- an export --------------------------------------------------------------------------
ONNX_FILE = "model.onnx"

# -- an evaluation -----------------------------------------------------------------------
EVAL_DIR = "eval"
INSPECT_DIR = "inspect"  # `vitkit inspect`'s figures and numbers
REPORT_FILE = "eval.json"
CONFUSION_FILE = "confusion.png"
