"""
Checkpoints: save atomically, keep the last K plus the best, resume from the newest that loads.

    manager = CheckpointManager("runs/demo", keep=3)
    manager.save(step, state, val_loss)          # state: any dict of tensors, numbers, strings, lists
    state, path = manager.load_latest()          # or load_checkpoint(path), or load_run(file_or_run_dir)

A checkpoint file is written to a temporary name, flushed to disk (fsync) and renamed, so a crash or a
kill mid-write never leaves a torn file under a real name. Loading uses torch.load(weights_only=True):
a checkpoint can only hold tensors and plain containers, never code that runs on load.
"""
import glob
import json
import os
import re
import shutil
import sys

import torch

from prep_dataset import disk_full

PREFIX = "ckpt-"


class CheckpointError(RuntimeError):
    pass


def load_checkpoint(path, map_location="cpu"):
    """Loads a checkpoint safely; anything but tensors and plain data is refused."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a torn file, or a pickle that asks for code: never run it
        # torch's own message is long and suggests weights_only=False: said here in a line instead
        text, refused = str(e), re.search(r"(?i)unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", str(e))
        with open(path, "rb") as f:
            head = f.read(4)
        if not head:
            why = "it is empty (its write never began: a crash, or a full disk)"
        elif refused:
            why = f"it holds a pickled object ({refused[1]}), which only code could rebuild"
        elif "Unpickl" in type(e).__name__ + text or not head.startswith((b"PK", b"\x80")):
            # torch.save writes a zip archive (PK), or in its old format a pickle (\x80): this is some other file
            why = "it is no checkpoint: torch.save did not write it"
        elif "zip archive" in text:
            why = "it is cut short or damaged (a copy that did not finish, a disk error)"
        else:
            why = f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"
        raise CheckpointError(f"{path} cannot be loaded safely: {why}. A checkpoint torn by a crash: resume from an "
                              "earlier one; never load untrusted files with weights_only=False.") from e
    if not isinstance(state, dict) or not {"model", "model_config"} <= state.keys():
        raise CheckpointError(f"{path} is not a checkpoint of train.py: it has no 'model' and 'model_config' "
                              "(a bare state_dict, or another project's file)")
    return state


def load_run(path, best=False, map_location="cpu"):
    """A checkpoint file, or a run directory: its best.pt when best=True and it has one (the lowest val
    loss; a run with no val split keeps none), else its newest checkpoint that loads. -> (state, path)"""
    if not os.path.isdir(path):
        return load_checkpoint(path, map_location), path
    manager = CheckpointManager(path)
    if best and os.path.isfile(manager.best_path):
        return load_checkpoint(manager.best_path, map_location), manager.best_path
    state, found = manager.load_latest(map_location)
    if state is None:
        raise CheckpointError(f"no checkpoint in {path}: give a run directory that train.py wrote, or a .pt file")
    return state, found


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a directory
    finally:
        os.close(fd)


def write_error(e):
    """The OSError behind an exception, or None. torch.save's zip writer meets a failed write (a full disk) as an
    OSError from the file, and raises a RuntimeError of its own as it closes ("unexpected pos"), with the OSError
    as its context."""
    while e is not None and not isinstance(e, OSError):
        e = e.__context__
    return e


def make_room(e, folder):
    """What to do about a write that failed: room on a full disk (or quota), else the right to write there."""
    if disk_full(e):
        return f"make room in {folder}"
    return f"make {folder} writable (or move the run to a folder that is)"


class CheckpointManager:
    def __init__(self, out_dir, keep=3):
        self.out_dir, self.keep = out_dir, keep
        self.best_path = os.path.join(out_dir, "best.pt")
        self.best_info = os.path.join(out_dir, "best.json")

    def checkpoints(self):
        """The step checkpoints in the run directory, oldest first."""
        return sorted(glob.glob(os.path.join(glob.escape(self.out_dir), PREFIX + "*.pt")))

    def save(self, step, state, val_loss=None):
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"{PREFIX}{step:08d}.pt")
        tmp = path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:  # a full disk: give back the part written, and say what to do
            if os.path.exists(tmp):
                os.remove(tmp)
            failed = write_error(e)
            if failed is None:
                raise
            raise CheckpointError(f"could not write {path} ({failed.strerror or failed}): "
                                  f"{make_room(failed, self.out_dir)}, then go on from its last checkpoint with --resume") from e
        os.replace(tmp, path)  # atomic: the name points at the whole old file or the whole new one
        if val_loss is not None and val_loss < self.best_val_loss():
            try:
                # the best is a hard link to this file: no copy, and it outlives the file's pruning
                try:
                    os.link(path, tmp)
                except OSError:  # a filesystem without hard links: a copy, still renamed into place whole
                    shutil.copyfile(path, tmp)
                os.replace(tmp, self.best_path)
                with open(self.best_info + ".tmp", "w") as f:
                    json.dump({"step": step, "val_loss": val_loss, "file": os.path.basename(path)}, f)
                os.replace(self.best_info + ".tmp", self.best_info)
            except OSError as e:  # the copy on a full disk: the step's checkpoint is whole, the best is the last one
                for part in (tmp, self.best_info + ".tmp"):
                    if os.path.exists(part):
                        os.remove(part)
                raise CheckpointError(f"saved {path}, but could not write {self.best_path} ({e.strerror or e}): "
                                      f"{make_room(e, self.out_dir)}, then go on from that checkpoint with --resume"
                                      ) from e
        fsync_dir(self.out_dir)
        for old in self.checkpoints()[:-self.keep] if self.keep > 0 else []:
            os.remove(old)
        return path

    def best_val_loss(self):
        try:
            with open(self.best_info) as f:
                return json.load(f)["val_loss"]
        except (OSError, ValueError, KeyError):
            return float("inf")

    def load_latest(self, map_location="cpu"):
        """The newest checkpoint that loads; a torn or corrupt one is passed over with a warning.
        -> (state, path), or (None, None) when the run directory has none. CheckpointError where it has some and
        none of them loads."""
        paths = self.checkpoints()
        for path in reversed(paths):
            try:
                return load_checkpoint(path, map_location), path
            except CheckpointError as e:
                print(f"warning: {e}\n  -> trying the previous checkpoint", file=sys.stderr)
        if paths:  # each was warned about above, with why it does not load
            raise CheckpointError(f"{self.out_dir} holds " + ("one checkpoint, which does not load" if len(paths) == 1
                                  else f"{len(paths)} checkpoints, none of which loads") + " (why: above)")
        return None, None
