"""Image data sets stored as one folder per class.

Layout: `DIR/train/<class>/<image>` for training and `DIR/test/<class>/<image>` for
evaluation, or `DIR/val/<class>/<image>` when there is no `test` folder. Images are JPEG
or PNG files of any size named *.jpg, *.jpeg or *.png (in any case). Other files, and
folders nested inside class folders, are ignored. Class indices are the positions of the
training class folder names in sorted order, so the evaluation folders use the same
indices.
"""

import logging
import os

from model_garden.data.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
EVAL_FOLDERS = ("test", "val")

# The expected layout, at the end of messages about missing or mismatched folders.
_LAYOUT_FIX = (
    "Lay the images out as DIR/train/<class>/*.jpg|png and DIR/test/<class>/* "
    "(or DIR/val/<class>/*), with the same class folders in both."
)


def is_class_folder_data(data):
    """Return True if `data` is a directory with a `train` subdirectory."""
    return bool(data) and os.path.isdir(os.path.join(data, "train"))


def split_folder(root, split):
    """Return the folder name of `split` ("train" or "test"): train, test or val.

    Raises:
      DataError: if `split` is "test" and `root` has neither a test nor a val folder.
    """
    if split == "train":
        return "train"
    for name in EVAL_FOLDERS:
        if os.path.isdir(os.path.join(root, name)):
            return name
    raise DataError(
        f"Expected a test or val folder next to the train folder. Received: "
        f"data={root!r}, which contains neither. {_LAYOUT_FIX}"
    )


def _subfolders(folder):
    """Return the sorted sub-folder names of `folder`, without hidden ones such as .git."""
    return sorted(
        entry.name for entry in os.scandir(folder)
        if entry.is_dir() and not entry.name.startswith(".")
    )


def _image_files(folder):
    return sorted(
        entry.path for entry in os.scandir(folder)
        if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
    )


def class_names(root):
    """Return the sorted class folder names under `root`/train, which define the labels.

    Raises:
      DataError: if the train folder has no subfolder.
    """
    train_dir = os.path.join(root, "train")
    names = _subfolders(train_dir)
    if not names:
        raise DataError(
            f"Expected one subfolder per class in {train_dir!r}. Received: data={root!r}, "
            f"whose train folder contains no subfolder. {_LAYOUT_FIX}"
        )
    return tuple(names)


def list_images(root, split):
    """List the images of one split and their labels.

    Returns:
      (folder, names, paths, labels): the split's folder name (train, test or val), the
      class names of the training split, and the image paths with their int labels.
      Paths take one image of every class in turn (in sorted order within a class), so
      any prefix of them spreads over the classes.

    Raises:
      DataError: if the train folder has no class folder, a class folder of the split
        has no image, or the evaluation split has a class that training lacks.
    """
    names = class_names(root)
    folder = split_folder(root, split)
    split_dir = os.path.join(root, folder)
    found = _subfolders(split_dir)

    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(
            f"Expected the class folders of {split_dir!r} to be among those of the train "
            f"folder, which define the labels. Received: classes only in {folder}="
            f"{unknown}. Add training images for them, or remove their {folder} folders. "
            f"{_LAYOUT_FIX}"
        )
    missing = sorted(set(names) - set(found))
    if missing:
        logging.warning(
            "%s has no folder for the classes %s; evaluation covers the other %d classes.",
            split_dir, missing, len(names) - len(missing),
        )

    images_per_class = {name: _image_files(os.path.join(split_dir, name)) for name in found}
    empty = [os.path.join(split_dir, name) for name in found if not images_per_class[name]]
    if empty:
        raise DataError(
            f"Expected JPEG or PNG files (*.jpg, *.jpeg, *.png) in every class folder. "
            f"Received: {len(empty)} folder(s) without one: {empty[:5]}. Add images to "
            "them or delete them."
        )

    label_of = {name: label for label, name in enumerate(names)}
    paths = []
    labels = []
    longest = max(len(files) for files in images_per_class.values())
    for index in range(longest):
        for name in found:
            files = images_per_class[name]
            if index < len(files):
                paths.append(files[index])
                labels.append(label_of[name])
    return folder, names, paths, labels
