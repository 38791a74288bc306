"""CIFAR-10 input pipeline and the embedded 6,000-record sample."""

from model_garden.data.pipeline import CLASS_NAMES
from model_garden.data.pipeline import IMAGE_SHAPE
from model_garden.data.pipeline import NUM_CLASSES
from model_garden.data.pipeline import SAMPLE_DIR
from model_garden.data.pipeline import DataError
from model_garden.data.pipeline import convert_read_errors
from model_garden.data.pipeline import count_records
from model_garden.data.pipeline import list_files
from model_garden.data.pipeline import make_dataset
from model_garden.data.pipeline import split_pattern
