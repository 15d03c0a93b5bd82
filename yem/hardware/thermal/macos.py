"""macOS: `NSProcessInfo.thermalState`, read through ctypes on libobjc (no sudo, no pyobjc)."""

import ctypes
from collections.abc import Callable

from yem.hardware.thermal.reading import Reading, ThermalState

FOUNDATION = "/System/Library/Frameworks/Foundation.framework/Foundation"
LIBOBJC = "/usr/lib/libobjc.A.dylib"


def mac_state(value: int) -> ThermalState:
    """NSProcessInfoThermalState 0-3 (nominal, fair, serious, critical) to a ThermalState."""
    return ThermalState(value) if 0 <= value <= 3 else ThermalState.UNKNOWN


def objc_thermal_state() -> Callable[[], int]:
    """A function returning `[[NSProcessInfo processInfo] thermalState]`; loads libobjc only when called."""
    ctypes.CDLL(FOUNDATION)  # registers the NSProcessInfo class with the runtime
    objc = ctypes.CDLL(LIBOBJC)
    objc.objc_getClass.argtypes = objc.sel_registerName.argtypes = [ctypes.c_char_p]
    objc.objc_getClass.restype = objc.sel_registerName.restype = ctypes.c_void_p
    address = ctypes.cast(objc.objc_msgSend, ctypes.c_void_p).value
    # arm64 objc_msgSend must be called through the method's exact prototype (it is not variadic there), so
    # each return type gets its own function object rather than mutating the shared objc_msgSend.restype.
    send_id = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(address)
    send_long = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)(address)  # NSInteger
    process_info = send_id(objc.objc_getClass(b"NSProcessInfo"), objc.sel_registerName(b"processInfo"))
    if not process_info:
        raise OSError("NSProcessInfo is not available")
    selector = objc.sel_registerName(b"thermalState")
    return lambda: send_long(process_info, selector)


class MacSensor:
    """macOS's thermal state, as apps see it. `query` returns the raw enum value (injected by tests)."""

    def __init__(self, query: Callable[[], int] | None = None):
        self._query = query

    def read(self) -> Reading:
        try:
            if self._query is None:
                self._query = objc_thermal_state()
            value = int(self._query())
        except (OSError, AttributeError, ValueError) as e:
            return Reading(ThermalState.UNKNOWN, "macos", f"thermalState unreadable ({e})")
        state = mac_state(value)
        return Reading(state, "macos", f"macOS thermal state {state.label} ({value})")
