"""dockyard.proto"""
