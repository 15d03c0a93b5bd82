"""macOS: `NSProcessInfo.thermalState` through libobjc, and the thermal pressure level through libSystem's Darwin
notify API, both read with ctypes (no sudo, no pyobjc); neither library is loaded before the first read.

thermalState compresses the pressure levels: "fair" covers both moderate and heavy, and heavy is where macOS
really starts throttling (notes/apple.md §4). So the sensor reads both and reports the worse: heavy pressure
counts as serious (the governor pauses), trapping and sleeping as critical (it stops).
"""

import ctypes
from collections.abc import Callable

from yem.hardware.thermal.reading import Reading, ThermalState

FOUNDATION = "/System/Library/Frameworks/Foundation.framework/Foundation"
LIBOBJC = "/usr/lib/libobjc.A.dylib"
LIBSYSTEM = "/usr/lib/libSystem.B.dylib"
# kOSThermalNotificationPressureLevelName (libkern/OSThermalNotification.h); private, but stable since macOS 10.10
PRESSURE_KEY = b"com.apple.system.thermalpressurelevel"
# The key's macOS values (iOS uses another scale): the state each counts as for the governor, and its name
PRESSURE_LEVELS = {0: (ThermalState.NOMINAL, "nominal"), 1: (ThermalState.FAIR, "moderate"),
                   2: (ThermalState.SERIOUS, "heavy"), 3: (ThermalState.CRITICAL, "trapping"),
                   4: (ThermalState.CRITICAL, "sleeping")}
NOTIFY_STATUS_OK = 0


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


def notify_pressure_level() -> Callable[[], int]:
    """A function returning the notify state of com.apple.system.thermalpressurelevel; loads libSystem only
    when called. The token is registered once; each read is one notify_get_state."""
    system = ctypes.CDLL(LIBSYSTEM)
    system.notify_register_check.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    system.notify_get_state.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint64)]
    system.notify_register_check.restype = system.notify_get_state.restype = ctypes.c_uint32
    token = ctypes.c_int()
    status = system.notify_register_check(PRESSURE_KEY, ctypes.byref(token))
    if status != NOTIFY_STATUS_OK:
        raise OSError(f"notify_register_check returned {status}")

    def read() -> int:
        level = ctypes.c_uint64()
        status = system.notify_get_state(token, ctypes.byref(level))
        if status != NOTIFY_STATUS_OK:
            raise OSError(f"notify_get_state returned {status}")
        return level.value

    return read


class MacSensor:
    """macOS's thermal state and thermal pressure level, the worse of the two. `query` and `pressure` return the
    raw values (injected by tests); by default each is made on the first read, loading its library then."""

    def __init__(self, query: Callable[[], int] | None = None, pressure: Callable[[], int] | None = None):
        self._readers = {"thermal state": query, "pressure": pressure}
        self._makers = {"thermal state": objc_thermal_state, "pressure": notify_pressure_level}

    def read(self) -> Reading:
        state, said = self._signal("thermal state", lambda v: (mac_state(v), mac_state(v).label))
        level, heard = self._signal("pressure", lambda v: PRESSURE_LEVELS.get(v, (ThermalState.UNKNOWN, "unknown")))
        worse = max(state, level)
        if worse is ThermalState.UNKNOWN:
            return Reading(worse, "macos", f"thermalState and pressure unreadable ({said}; {heard})")
        return Reading(worse, "macos", f"macOS thermal state {said}, pressure {heard}")

    def _signal(self, name: str, meaning: Callable[[int], tuple[ThermalState, str]]) -> tuple[ThermalState, str]:
        """One signal's state and its words ("heavy (2)", or why it could not be read)."""
        try:
            if self._readers[name] is None:
                self._readers[name] = self._makers[name]()
            value = int(self._readers[name]())
        except (OSError, AttributeError, ValueError) as e:
            return ThermalState.UNKNOWN, f"unreadable: {e}"
        state, words = meaning(value)
        return state, f"{words} ({value})"
