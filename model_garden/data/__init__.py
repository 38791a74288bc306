"""Input pipelines: CIFAR-10 and ImageNet-style TFRecords, class folders, the sample."""

from model_garden.data.errors import DataError
from model_garden.data.errors import convert_read_errors
from model_garden.data.pipeline import CACHE_MODES
from model_garden.data.pipeline import CLASS_NAMES
from model_garden.data.pipeline import IMAGE_SHAPE
from model_garden.data.pipeline import NUM_CLASSES
from model_garden.data.pipeline import SplitInfo
from model_garden.data.pipeline import dataset_from_split
from model_garden.data.pipeline import make_dataset
from model_garden.data.pipeline import read_split
from model_garden.data.preprocessing import PREPROCESSINGS
from model_garden.data.tfrecords import SAMPLE_DIR
from model_garden.data.tfrecords import count_records
from model_garden.data.tfrecords import list_files
from model_garden.data.tfrecords import split_pattern
