"""Conversions between `worldstream.v1` messages and the API objects, shared by the decoder (validating what
clients send, describing its mode) and the client (building what it sends, learning the mode from `SessionInfo`)."""
from __future__ import annotations

from .layout import BlockLayout
from .spaces import ActionSpace, BlockAction
from worldstream.v1 import session_pb2


def parse_action(message: session_pb2.Action, space: ActionSpace, layout: BlockLayout, block_index: int | None,
                 where: str = "action") -> BlockAction:
    """An action message as a validated BlockAction (sizes, ranges, NaN, one-hot); ValueError says what is wrong.
    `block_index` is the block it applies to, or None when unknown (REALTIME), where per-frame rows are refused."""
    forms = [name for name in ("keyboard", "keys", "frames") if len(getattr(message, name))]
    if len(forms) > 1:
        raise ValueError(f"{where}: give only one of keyboard, keys and frames (got {', '.join(forms)})")
    mouse = list(message.mouse) or None
    if message.frames:
        if block_index is None:
            raise ValueError(f"{where}: per-frame rows (`frames`) need LOCKSTEP pacing, where each action has "
                             "its block")
        expected = layout.frames(block_index)
        if len(message.frames) != expected:
            raise ValueError(f"{where}: block {block_index} spans {expected} pixel frames, got "
                             f"{len(message.frames)} rows in `frames`")
        if mouse is not None:
            raise ValueError(f"{where}: with `frames`, give the mouse per frame (frames[i].mouse), not in `mouse`")
        rows_mouse = [list(frame.mouse) for frame in message.frames]
        with_mouse = sum(1 for row in rows_mouse if row)
        if with_mouse not in (0, len(rows_mouse)):
            raise ValueError(f"{where}: set frames[i].mouse on every row or on none")
        return space.from_vectors([list(frame.keyboard) for frame in message.frames],
                                  rows_mouse if with_mouse else None, where)
    try:
        keyboard = list(message.keyboard) or space.keyboard_vector(list(message.keys))  # no keys: idle
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return space.from_vectors(keyboard, mouse, where)


def action_message(action: BlockAction) -> session_pb2.Action:
    """A BlockAction as a message: held vectors for one row, per-frame rows otherwise."""
    keyboard = action.keyboard.tolist()
    mouse = action.mouse.tolist() if action.mouse is not None else [[] for _ in keyboard]
    if action.n_rows == 1:
        return session_pb2.Action(keyboard=keyboard[0], mouse=mouse[0])
    return session_pb2.Action(frames=[session_pb2.ActionFrame(keyboard=k, mouse=m) for k, m in zip(keyboard, mouse)])


def action_space_message(space: ActionSpace) -> session_pb2.ActionSpace:
    bindings = []
    for key in sorted(set(space.keyboard_bindings) | set(space.mouse_bindings)):
        index = space.keyboard_bindings.get(key)
        bindings.append(session_pb2.KeyBinding(key=key, key_name=space.key_names[index] if index is not None else "",
                                               mouse=space.mouse_bindings.get(key, ())))
    return session_pb2.ActionSpace(key_names=space.key_names, mouse_dim=space.mouse_dim, one_hot=space.one_hot,
                                   idle_key=space.idle_key or "", mouse_limit=space.mouse_limit,
                                   camera_step=space.camera_step, bindings=bindings)


def action_space_from_message(mode: str, message: session_pb2.ActionSpace) -> ActionSpace:
    """The ActionSpace a server describes in `SessionInfo` (mode, action_space). A binding without a key name
    and without a mouse delta is a keyboard "release" key."""
    key_names = tuple(message.key_names)
    if not key_names or len(set(key_names)) != len(key_names):
        raise ValueError(f"the server's action space has no or repeated key names: {list(key_names)}")
    if message.mouse_dim not in (0, 2):
        raise ValueError(f"the server's action space has mouse_dim {message.mouse_dim}; this client knows 0 and 2")
    if message.idle_key and message.idle_key not in key_names:
        raise ValueError(f"the server's idle key {message.idle_key!r} is not one of {list(key_names)}")
    keyboard_bindings: dict[str, int | None] = {}
    mouse_bindings: dict[str, tuple[float, float]] = {}
    for binding in message.bindings:
        if binding.key_name and binding.key_name not in key_names:
            raise ValueError(f"the server binds key {binding.key!r} to {binding.key_name!r}, which is not one of "
                             f"{list(key_names)}")
        if len(binding.mouse) not in (0, 2):
            raise ValueError(f"the server binds key {binding.key!r} to a mouse delta of {len(binding.mouse)} values")
        if binding.key_name or not binding.mouse:
            keyboard_bindings[binding.key] = key_names.index(binding.key_name) if binding.key_name else None
        if binding.mouse:
            mouse_bindings[binding.key] = (binding.mouse[0], binding.mouse[1])
    return ActionSpace(name=mode, key_names=key_names, mouse_dim=message.mouse_dim,
                       keyboard_bindings=keyboard_bindings, mouse_bindings=mouse_bindings, one_hot=message.one_hot,
                       idle_key=message.idle_key or None, camera_step=message.camera_step,
                       mouse_limit=message.mouse_limit)
