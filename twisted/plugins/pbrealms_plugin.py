from twisted.application.service import ServiceMaker

pbrealms = ServiceMaker(
    "pbrealms", "pbrealms.tap", "Perspective Broker server with a choice of realms", "pbrealms"
)
