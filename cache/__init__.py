"""dockyard.cache"""
