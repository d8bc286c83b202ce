"""The CSI Identity service: who the plugin is, what it offers, whether it is ready."""

from __future__ import annotations

import grpc

from cachefs import __version__
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.rpc import DRIVER_NAME, rpc


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, controller: bool) -> None:
        self.controller = controller

    @rpc
    def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest,
                      context: grpc.ServicerContext) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    @rpc
    def GetPluginCapabilities(self, request: csi_pb2.GetPluginCapabilitiesRequest,
                              context: grpc.ServicerContext
                              ) -> csi_pb2.GetPluginCapabilitiesResponse:
        service = csi_pb2.PluginCapability.Service
        types = [service.VOLUME_ACCESSIBILITY_CONSTRAINTS]
        if self.controller:
            types.insert(0, service.CONTROLLER_SERVICE)
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[
            csi_pb2.PluginCapability(service=service(type=t)) for t in types])

    @rpc
    def Probe(self, request: csi_pb2.ProbeRequest,
              context: grpc.ServicerContext) -> csi_pb2.ProbeResponse:
        response = csi_pb2.ProbeResponse()
        response.ready.value = True
        return response
