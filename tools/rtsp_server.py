#!/usr/bin/python3
"""A test RTSP camera: GStreamer's RTSP server (through GObject introspection) streaming H.264
(or H.265) from videotestsrc on loopback. Debian: python3-gi gir1.2-gst-rtsp-server-1.0
gstreamer1.0-plugins-ugly (x264enc), gstreamer1.0-plugins-bad (x265enc).

    /usr/bin/python3 tools/rtsp_server.py --port 8554 --path /line [--codec h265]
"""
import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8554)
    ap.add_argument("--path", default="/line")
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--fps", type=int, default=10)
    ap.add_argument("--codec", choices=["h264", "h265"], default="h264")
    a = ap.parse_args()
    w, h = a.size.split("x")
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(a.port))
    factory = GstRtspServer.RTSPMediaFactory()
    enc = {
        "h264": f"x264enc tune=zerolatency speed-preset=ultrafast key-int-max={a.fps} ! rtph264pay",
        "h265": f"x265enc tune=zerolatency speed-preset=ultrafast key-int-max={a.fps} ! rtph265pay",
    }[a.codec]
    factory.set_launch(
        f"( videotestsrc is-live=true pattern=ball ! video/x-raw,width={w},height={h},framerate={a.fps}/1 "
        f"! {enc} name=pay0 pt=96 )"
    )
    factory.set_shared(True)
    server.get_mount_points().add_factory(a.path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{a.port}", file=sys.stderr)
        return 1
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)
    try:
        print(f"rtsp://127.0.0.1:{a.port}{a.path}", flush=True)
    except BrokenPipeError:
        pass  # whoever started us stopped listening; keep serving
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
