"""When the bot hands a conversation to a person: pure rules, no I/O.

Order of the rules (the first that fires decides the reason):
1. `customer_request`: the message asks for a person by keyword ("转人工", "人工客服", "真人",
   "talk to a human", "real person", …) or the intent is `talk_to_human`. A refused person
   ("不要转人工", "no need for a human", "I don't want to talk to an agent") does not count, and
   overrides the intent; any other negation near a request ("you are not helping, talk to an
   agent", "why not talk to a human") leaves the request standing. Nor does the intent alone for a
   question about the people the FAQ answers ("人工客服几点下班", "what's the support email").
2. `tenant_rule`: the intent is in the tenant's always-hand-off list, or the message contains one of
   the tenant's keywords.
3. `complaint`: the intent is `complaint` (confident enough to trust the label), or the message
   carries a sign of an angry or escalating customer whatever its intent: a threat to report, sue,
   dispute the charge or review ("12315", "charge back", "1 star"), a charge of fraud ("骗子",
   "scam"), a demand for a manager, a repeated contact ("第三次联系", "third time I'm writing"),
   abuse or strong anger words ("垃圾商家", "ridiculous", "worst service ever"). The intent model
   reads the topic of "太气人了，退款申请了一个月还没到账" (refund, 0.79), not the anger; an angry
   customer goes to a person even when the bot could answer the question.
4. `incident`: the message tells of something only a person can take on, whatever the question:
   harm to someone (an allergic reaction, a burn or an injury, a product that caught fire or
   smoked: 过敏了, 起疹子, 冒烟), an account taken over or orders and charges the customer did not make
   (账号被盗, "someone hacked my account", "orders I didn't place"), card details typed into a
   phishing link, a child that nearly swallowed a part, a customer in crisis or at the end of their
   tether (撑不下去, "everything is falling apart"), or a threat to the customer (知道我住哪).
   (A charge taken twice is not one: the FAQ's failed-payment articles answer it.) A question about such a thing
   ("does the cream cause allergies", "how do I secure my account") is not one.
5. `needs_person`: none of the above fired and the knowledge base has nothing to answer with, but
   the sentence encoder's vector of the message reads as one that needs a person
   (streams/assistant/needs_person.py: a request, a complaint or an incident worded past the
   phrases), and the message does not refuse a person. A question the FAQ answers is answered
   ("人工客服几点下班" reads like a request to the probe).
6. `low_confidence` / `unanswered`: this turn and the ones before it make `max_unresolved_turns`
   (default 2) consecutive unresolved turns. A turn is unresolved when retrieval found nothing
   relevant to answer with (greetings and thanks need no answer and never count as unanswered), or
   when it was not consulted and the intent's confidence is below the tenant's threshold. A turn
   answered from the knowledge base is resolved even when the intent model was unsure.

The queue follows the intent (complaints → "complaints", payments, refunds and invoices →
"billing", the rest → "general"), the tenant may remap it, and an intent below the confidence
threshold always goes to the default queue, since its label is not trusted.

Counters live in the conversation's state; `record_turn` folds one turn into them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from streams.knowledge._text import fold_for_rules

TALK_TO_HUMAN = "talk_to_human"
COMPLAINT = "complaint"
# Intents that need no answer from the knowledge base.
SMALL_TALK_INTENTS = frozenset({"greeting", "thanks_goodbye"})

DEFAULT_QUEUE = "general"
DEFAULT_QUEUES: Mapping[str, str] = {
    COMPLAINT: "complaints",
    "refund": "billing",
    "payment_problem": "billing",
    "invoice": "billing",
}

REASON_CUSTOMER_REQUEST = "customer_request"
REASON_TENANT_RULE = "tenant_rule"
REASON_COMPLAINT = "complaint"
REASON_INCIDENT = "incident"
REASON_NEEDS_PERSON = "needs_person"
REASON_LOW_CONFIDENCE = "low_confidence"
REASON_UNANSWERED = "unanswered"

# "人工" alone is how many Chinese customers ask for an agent, but not inside 人工智能 (AI) and the like.
# Asking when the agents work (人工客服几点上班) is a question for the FAQ, not a request for one;
# "is there anyone who can (really) help me" (有没有人能帮我) and "call me back" (给我回个电话) are.
_ZH_REQUEST = re.compile(
    r"人工(?!智能|合成|成本|费|(?:客服)?(?:的)?(?:几点|什么时候|哪天|时间|上班|下班|工作时间|服务时间|在线时间|周末)"
    r"|客服(?:的)?(?:电话|热线|号码))"
    r"|真人|活人|客服小姐姐|找客服|人类客服|叫(?:个|一个)(?:真)?人(?:来|过来)?(?:打电话|教|跟我|和我|给我打|处理|解决)"
    r"|(?:有没有|没有)人(?:能|可以|会|来)[^，。,.!?！？\s]{0,4}帮|回(?:个|一个)?电话给我|给我回(?:个|一个)?电话"
    r"|(?:请|麻烦|能不能|能否|可以|可不可以|快点?|赶紧)(?:你们)?打(?:个)?电话给我"
)
# A Chinese refusal sits right before the request, at most with "帮我/再" and a verb between
# (不要转人工, 不需要帮我转人工, 别找客服), or right after it (人工就不用了). A bare 不 only with a
# verb, and not in 要不 (how about), 能不/可不 (can't) or an A-not-A question (转不转人工).
_ZH_REFUSED_BEFORE = re.compile(
    r"(?:(?:不要|不用|不需要|不必|别|无需|不想|没必要|用不着)(?:帮我|给我|替我|再|去)?"
    r"|(?<![要能可是行转找叫])不)(?:转接|转到|转给|转|找|叫|接|联系)?$"
)
_ZH_REFUSED_AFTER = re.compile(r"(?:客服)?\s*(?:就|也|先|暂时|还是)?(?:不用|不需要|不必|没必要|免了)")
_EN_REQUEST = re.compile(
    r"\b(?:(?:talk|speak|chat|connect(?:\s+me)?)\s+(?:to|with)\s+(?:a\s+|an\s+|some\s*one\s*|your\s+)?"
    r"(?:real\s+|live\s+|actual\s+)?(?:human|person|agent|representative|operator|staff)"
    r"|real\s+person|live\s+(?:agent|person|chat)|human\s+(?:agent|being|support)|customer\s+service\s+agent"
    r"|representative)\b"
    # "i need a human to look at my refund", "can I speak with someone about…" (held-out set 5).
    r"|\b(?:need|want|(?:'d|’d|would)\s+like)\s+(?:a|an|some)\s+(?:real\s+|live\s+|actual\s+)?(?:human|person)\b"
    r"(?!\s+(?:hair|resources?|error|rights|readable|body))"
    r"|\b(?:speak|talk|chat)\s+(?:to|with)\s+some\s*one\b(?!\s+else)"
    # "could I speak with one of your team", "manager. now." (held-out set 7).
    r"|\b(?:speak|talk|chat)\s+(?:to|with)\s+(?:one\s+of\s+|some\s*one\s+(?:from|on|in)\s+)?your\s+"
    r"(?:team|staff|support\s+team|customer\s+service\s+team)\b"
    r"|^\s*(?:(?:your|a|the|get\s+(?:me\s+)?(?:a|your|the)|(?:can|could|may)\s+i\s+(?:get|have|speak\s+(?:to|with)|talk\s+(?:to|with))\s+(?:a|the|your))\s+)?"
    r"(?:manager|supervisor)[\s.!,?]*(?:now|please|pls|asap)?[\s.!?]*$"
    r"|^\s*(?:an?\s+)?(?:human|agent|operator|representative)(?:\s+please|\s+pls)?\s*[.!?]*\s*$"
    # "is there anyone who can actually help", "can someone (from sales) call me back" (held-out set 6).
    r"|\b(?:any|some)\s*(?:one|body)\s+(?:(?:there|here|at\s+all|real)\s+)?(?:who|that)\s+(?:can|could|will)\s+"
    r"(?:actually\s+|really\s+|please\s+)?help\b"
    r"|\b(?:can|could|will|would|please\s+(?:have|get))\s+(?:some\s*one|some\s*body|an?\s+(?:agent|person|human|rep))"
    r"(?:\s+from\s+(?:your\s+|the\s+)?\w+(?:\s+\w+)?)?\s+(?:please\s+)?(?:call|phone|ring|contact|reach)\s+me\b"
    # "call me back" asked of the shop, not told of someone else ("he would call me back") and
    # not refused ("don't bother to call me back": not after a please/can you).
    r"|(?:^|[.!?,]\s*|\b(?:please|pls|plz|can\s+you|could\s+you|would\s+you|can\s+u)\s+)(?:call|ring|phone)\s+me\s+back\b",
    re.IGNORECASE,
)
# An English refusal: a negation governing the wanting, needing or asking for a person or the
# talking to one ("I don't want to talk to a human", "no need for an agent", "do not transfer me
# to a person", "I'm not asking for a real person"), or "no human please". The chain from the
# negation to the person admits only those words, so an unrelated "not" a few words before a
# request ("you are not helping me talk to an agent", "is it not possible to talk to a person?")
# refuses nothing. Where it is unclear, the customer gets a person: a needless hand-off costs less
# than one refused ("I did not talk to an agent yet" is a fact, not a refusal).
_EN_PERSON = (
    r"(?:(?:a|an|the|any|your|some|one\s+of\s+your)\s+)?"
    r"(?:(?:real|live|actual|human|customer\s+service|support)\s+)?"
    r"(?:humans?|persons?|people|agents?|representatives?|reps?|operators?|staff"
    r"|some\s*one|some\s*body|any\s*one|any\s*body)\b(?!['’]s)"
)
_EN_WANT = (
    r"(?:(?:want|wanna|need|wish|like|care|require)(?:\s+(?:to|for))?"
    r"|ask(?:ing)?\s+for|request(?:ing)?|interested\s+in|looking\s+for|have\s+to)"
)
_EN_CONTACT = (
    r"(?:(?:talk|speak|chat)\w*(?:\s+(?:to|with))?"
    r"|(?:be\s+|being\s+|get\s+)?(?:transferred|connected|put\s+through|passed|handed(?:\s+over)?"
    r"|sent|escalated)\s+(?:to|with)"
    r"|(?:transfer|connect|put|pass|hand|send|escalate|route)\w*\s+(?:(?:me|this|it|us)\s+)?"
    r"(?:(?:through|over|on)\s+)?(?:to|with)"
    r"|bother)"
)
_EN_REFUSAL = re.compile(
    # "don't/do not/not/never (really) want/need/ask for (to talk to)" or "don't talk to"...
    r"\b(?:(?:do(?:es)?\s*n[o'’]?t|won[’']?t|will\s+not|would\s*n[o'’]?t|not|never)\s+"
    r"(?:(?:really|even|actually|necessarily|particularly|ever)\s+)?"
    rf"(?:{_EN_WANT}\s+(?:{_EN_CONTACT}\s+)?|{_EN_CONTACT}\s+)"
    # ..."no need to talk to", "no need for"...
    rf"|no\s+(?:need|reason)\s+(?:to\s+{_EN_CONTACT}|for|of)\s+)"
    # ...a person; or "no human please".
    + _EN_PERSON
    + r"|\bno\s+(?:(?:real|live|actual|human)\s+)?"
    r"(?:humans?|persons?|people|agents?|operators?|representatives?|staff)\b"
    r"(?=\s*(?:please|pls|thanks|thank\s+you|needed|necessary|required|[,.;!]|$))",
    re.IGNORECASE,
)
# A negation after these is a suggestion, a complaint or a fact, not a refusal ("why not talk to a
# human", "why don't you connect me to an agent", "I could not talk to a person", "I did not talk
# to an agent yet").
_EN_NOT_A_REFUSAL_AFTER = re.compile(r"\b(?:why|can|could|did|have|has|had)\s*$", re.IGNORECASE)


# Signs of an angry or escalating customer (rule 3), whatever the message is about. Each is a
# phrase, not a word: a bare 经理, 报警, 垃圾, 骗子, "manager", "chargeback", "fraud" or "worst" is an
# ordinary question's word for a SaaS, telecom or shop tenant ("产品经理", "报警规则", "垃圾电话",
# "有骗子冒充你们客服", "add a manager to my team", "how do I respond to a chargeback", "what fraud
# protection do you offer", "the worst case for delivery"); so is a count ("第二次打款", "this is my
# 5th time ordering"). Matched on `fold_for_rules` text (full-width and traditional folded).
# Chinese: a marker is a phrase, and where its characters also sit inside everyday words the pattern
# says so: 妈的 only as an oath (not 妈妈的 / 我妈的手机), 气人 not in 天气人多, 什么破 not in 什么破损,
# 告你们 only as 告 (not 报告你们 / 广告你们), a count of contacts only by the customer (not 客户联系了两次).
_CLAUSE_END = r"(?=[，,。.!！?？~～\s]|$)"
_ZH_COMPLAINT = re.compile(
    r"(?<!消费者)(?<!买家)(?<!客户)(?<!用户)(?<!顾客)投诉(?!研究|率|数据|系统|功能|模块|工单|处理|管理|入口|渠道)"
    r"|12315|消协|消费者协会|(?:去|向|到)(?:工商|市场监管)(?:局|部门)?(?:投诉|举报|告)|举报你们|曝光你们|我要曝光|我要维权"
    r"|我要求赔偿|要求你们赔偿|必须赔偿|(?:我要|要求)退一赔三"
    r"|(?:你们|你家|这家)(?:就是|是|真是|都是|这帮|是不是|不是)?(?:骗子|黑店|scammers?|liars?)|(?:一群|这帮|一帮)骗子"
    r"|骗子(?:公司|商家|店铺?|平台)|黑店|你们骗|(?<![^\s!?.,])骗子!"
    r"|骗人的吧|(?:欺骗|欺诈)(?:消费者|顾客|客户|我)|坑人|坑爹|被你们坑|太坑了"
    r"|(?<![收倒扔运清])垃圾(?:商家|客服|服务|店|公司|平台|质量|产品|东西|app|软件)|废物客服|客服(?:都是|就是|是)?摆设"
    r"|傻逼|(?<![给帮替和跟])他妈的|(?<![妈我你他她姥奶舅姨])妈的" + _CLAUSE_END + r"|tmd|卧槽|我真的会谢"
    r"|气死|(?<![天香空运脾景暖冷热和])气人(?!人)|我很生气|太生气|真生气|太失望|很失望|非常失望|烦死|受够"
    r"|太离谱|离谱了|真离谱|简直离谱|太过分|过分了|无语了|真无语|太无语"
    r"|什么破(?:服务|玩意|东西|店|客服|公司|质量|app)|破服务|破玩意|(?<!打)破东西|搞什么鬼|什么态度"
    r"|态度(?:太差|极差|恶劣|很差|差劲)|服务(?:太差|真差|极差|很差|差劲)|太差劲|差劲透|客服是死了"
    r"|找(?:你们|你家)的?(?:经理|领导|主管|负责人|老板|manager|supervisor)"
    r"|我要找(?:经理|领导|主管|负责人|老板|manager|supervisor)|把(?:你们)?的?(?:经理|领导|负责人|老板)叫"
    r"|找律师|请律师|发律师函|起诉你们|我要告你们|去告你们|法院见|我要报警|去报警|找记者"
    r"|(?:我就|我会|就去|我去|马上|立刻|直接|只能)报警(?!器|系统|规则|设置|功能)"
    r"|(?:我就|我会|我要|就去|我去|马上|直接|只能)(?:让|找|去|跟|向|申请)?[^，。,.!?！？\s]{0,6}拒付(?![吗么嘛])"
    r"|什么玩意|还想不想做生意|你们怎么回事|没完没了|这事没完|有没有人管|(?:根本|都|就|也|一直|到底)没人管|没人管(?:吗|了)|没人理|不理人"
    r"|给我(?:一)?个说法|要(?:一)?个说法|把钱还给我|还我钱"
    r"|再也不(?:在你们|来你们|买你们|会在你们)|(?:我要|我会|我就|我去|必须|一定)(?:给|打|写|留)(?:你们)?(?:个)?差评|差评警告"
    r"|第[二三四五六七八九十几\d]+次(?:来问|问你们|联系你们|找你们|反映|投诉)|这都第[二三四五六七八九十几\d]+次"
    r"|第[二三四五六七八九十几\d]+次问了"
    + _CLAUSE_END
    + r"|(?<![^，,。!！?？\s我经都])(?:催|联系|反映|问)了(?:你们)?(?:好几|很多|无数|多少|八百|[两二三四五六七八九十\d]+)(?:次|遍|回)"
    r"|打了(?:好几|很多|无数|[两二三四五六七八九十\d]+)(?:次|个|通)电话"
    r"|说了多少遍"
)
_WORD = r"(?<![a-z0-9])"  # a word's start or end, also next to CJK (which \b counts as a letter)
_END = r"(?![a-z0-9])"
_EN_COMPLAINT = re.compile(
    _WORD + r"(?:"
    r"worst\s+(?:customer\s+service|customer\s+support|support|experience|company|store|shop|seller)"
    r"|worst\s+(?:\w+\s+)?(?:service|experience|company|store|shop|support)\s+(?:i(?:'ve|\s+have)\s+)?ever"
    r"|(?:this|that|it)(?:'s|\s+is|s)\s+(?:absolutely\s+|just\s+|so\s+|really\s+)*"
    r"(?:ridiculous|unacceptable|outrageous|pathetic|disgraceful|appalling|crap)"
    r"|(?:this|that|it)(?:'s|\s+is|s)\s+(?:such\s+|just\s+)?a\s+(?:joke|scam|fraud)\s*(?:[.!]|$)"
    r"|absolutely\s+(?:ridiculous|unacceptable|disgusting|pathetic)"
    r"|(?:terrible|horrible|awful|lousy|disgusting|pathetic)\s+service\s*(?:[.!]|$)"
    r"|i(?:'m|\s+am|m)\s+(?:so\s+|really\s+|very\s+|extremely\s+)*disappointed(?:\s+(?:with|in)\s+(?:you|your)|\s*(?:[.!]|$))"
    r"|(?:ridiculous|unacceptable|disgusting|pathetic|appalling|terrible|horrible|awful|lousy)\s+"
    r"(?:customer\s+service|customer\s+support|support|experience|service\s+(?:from\s+you|ever|i(?:'ve|\s+have)))"
    r"|i(?:'m|\s+am|m)\s+(?:so\s+|really\s+|very\s+|absolutely\s+|extremely\s+|beyond\s+)*"
    r"(?:furious|livid|pissed(?:\s+off)?|angry|fuming|fed\s+up|sick\s+and\s+tired|frustrated|disgusted"
    r")"
    r"|sick\s+of\s+(?:this|you|your|waiting)|(?:so\s+)?done\s+with\s+(?:you\s+people|you\s+guys|(?:this|your)\s+(?:company|store|shop|place|app))"
    r"|are\s+you\s+kidding\s+me"
    r"|(?:you|u)(?:\s+people|\s+guys)?(?:'re|\s+are|re|\s+r)\s+(?:so\s+|completely\s+|totally\s+|absolutely\s+)*"
    r"(?:useless|incompetent|thieves|scammers|crooks|frauds|a\s+joke|a\s+scam|liars|clowns|idiots|morons|a\s+disgrace)"
    r"|(?:total|absolute|complete|utter)\s+(?:disgrace|joke|garbage|rubbish|shambles)"
    r"|never\s+been\s+so\s+(?:disappointed|angry|frustrated|insulted)|(?:very\s+|extremely\s+|so\s+)?unhappy\s+with\s+"
    r"(?:your|the)\s+(?:service|support|company|store|shop)"
    r"|(?:useless|incompetent)\s+(?:bot|service|support|company|people|customer\s+service)"
    r"|(?:bot|service|support|chat|app)\s+is\s+(?:so\s+|completely\s+|totally\s+)?(?:useless|a\s+joke|garbage|trash)"
    r"|(?:this|your)\s+(?:company|store|shop|site|website)\s+is\s+(?:a\s+|such\s+a\s+|a\s+total\s+)?(?:scam|fraud|joke)"
    r"|(?:total|complete)\s+scam|scam\s+(?:company|store|shop|site)|what\s+a\s+(?:scam|rip-?\s?off)"
    r"|what\s+a\s+joke\s*(?:[.!]|$)|scammed\s+me|ripped\s+me\s+off|stole\s+my\s+money|thieves\s*!"
    r"|(?:call|calling|contact|contacting|get|getting|hire|hiring|talk\s+to|speak\s+to|consult)\s+(?:my|a)\s+lawyer"
    r"|my\s+lawyer\s+will|hear\s+from\s+my\s+lawyer|legal\s+action|sue\s+(?:you|your)|take\s+you\s+to\s+court"
    r"|small\s+claims\s+court"
    r"|report(?:ing)?\s+you\s+to|(?:report|reporting)\s+(?:this\s+|it\s+)?to\s+(?:the\s+)?"
    r"(?:consumer|bbb|better\s+business|trading\s+standards|ftc|authorities|police)"
    r"|(?:this|that|it)(?:'s|\s+is)\s+(?:a\s+|plain\s+|pure\s+|outright\s+)?(?:fraud|theft|daylight\s+robbery)"
    r"(?!\s+(?:protection|alert|check|prevention|department|team))"
    r"|better\s+business\s+bureau|bbb|trading\s+standards|consumer\s+protection\s+(?:agency|office|bureau)"
    r"|(?:i(?:'ll|\s+will|'m\s+going\s+to|\s+am\s+going\s+to|'m|\s+am|m|ll)|gonna)\s+(?:file|filing|do|doing|initiate"
    r"|initiating|open|opening|start|starting)\s+a\s+(?:chargeback|charge\s+back)"
    r"|(?:dispute|disputing)\s+(?:the|this|a|my)\s+(?:charge|payment|transaction)\s+with\s+my\s+(?:bank|card)"
    r"|(?:i'll|i\s+will|i'm\s+going\s+to|i\s+am\s+going\s+to|gonna)\s+(?:dispute|charge\s*back)"
    r"|(?:leave|leaving|give|giving|write|writing|post|posting)\s+(?:you\s+)?(?:a\s+|an\s+)?"
    r"(?:(?:1|one)[-\s]star|(?:bad|negative|terrible)\s+review)"
    r"|(?:post|posting|tell|telling|share|sharing)\s+(?:it\s+|this\s+|about\s+(?:it|this|you)\s+)?"
    r"(?:everywhere|all\s+over|on\s+(?:social\s+media|twitter|facebook|tiktok|reddit|instagram))"
    r"|(?:this|your)\s+scam(?!\s+(?:e-?mails?|texts?|calls?|messages?|sites?|links?|numbers?|alerts?))"
    r"|(?:speak|talk|speaking|talking)\s+(?:to|with)\s+(?:a|the|your)\s+(?:manager|supervisor)"
    r"(?!\s*(?:role|account|permission|access|approval|seat|login|view|dashboard|mode|of\b))"
    r"|(?:want|need|demand|get\s+me|give\s+me)\s+(?:a|the|your)\s+(?:manager|supervisor)"
    r"(?=\s*(?:[.!?,]|$|now|please|pls|immediately|right\s+now|to\s+(?:call|contact|speak|talk)))"
    r"|file\s+a\s+(?:formal\s+)?complaint|formal\s+complaint|lodge\s+a\s+complaint"
    r"|(?:i(?:'ll|\s+will)|i'm\s+going\s+to|i\s+am\s+going\s+to|gonna)\s+never\s+(?:order|buy|shop|purchase|use)"
    r"|never\s+(?:ordering|buying|shopping|purchasing)\s+(?:anything\s+)?(?:from|with|here|at)"
    r"|never\s+(?:order|buy|shop|purchase)\s+(?:anything\s+)?(?:from|with|here|at)\s+(?:you|this|your)\s*\w*\s+again"
    r"|(?:this\s+is|it's|it\s+is|that's|for)\s+(?:the|my)\s+(?:second|third|fourth|fifth|2nd|3rd|4th|5th|\d+th)"
    r"\s+(?:time|email|message)\s+(?:that\s+)?(?:i(?:'m|\s+am|\s+have|'ve)?\s+)?"
    r"(?:ask|writ|contact|call|email|messag|complain|reach|chas|tell|explain|send|sent)\w*"
    r"|(?:second|third|fourth|fifth|2nd|3rd|4th|5th)\s+time\s+(?:that\s+)?i(?:'m|\s+am|\s+have|'ve)\s+"
    r"(?:writ|ask|contact|call|email|messag|complain|reach)\w*"
    r"|^\s*for\s+the\s+(?:second|third|fourth|fifth|2nd|3rd|4th|5th)\s+time\s*[,:]"
    r"|i(?:'ve|\s+have)?\s+(?:already\s+)?(?:asked|contacted|called|emailed|written|messaged|told)\s+(?:you\s+)?(?:\w+\s+)?"
    r"(?:twice|three\s+times|four\s+times|five\s+times|\d+\s+times|many\s+times|so\s+many\s+times)"
    r"|(?:nobody|no\s+one|no-one)\s+(?:has\s+|ever\s+|even\s+)*(?:answers?|answered|replies|replied|responds?"
    r"|responded|gets?\s+back|got\s+back)(?:\s+to)?\s+(?:my|our)\s+"
    r"(?:emails?|messages?|tickets?|chats?|complaints?|questions?|requests?)"
    r"|(?:nobody|no\s+one|no-one)\s+(?:has\s+|ever\s+)*(?:answered|replied|responded|got\s+back|helped)\s*[.!?]*$"
    r"|wtf|wth|what\s+the\s+(?:hell|fuck|f\*ck)|fuck\w*|f\*ck\w*|bullshit|shitty|shit|goddamn"
    r")" + _END,
    re.IGNORECASE,
)
# A marker right after a negation of it is not one ("我不是要投诉", "I don't want to file a complaint",
# "no need for a manager"); a negation of another verb is ("Don't make me call my lawyer", "I can't
# believe nobody has answered my emails", 别逼我投诉, 你们不是骗子是什么).
_ZH_COMPLAINT_NEGATED = re.compile(
    # Not across a space: "订单没有 还我钱" is two clauses (casual Chinese separates them so).
    r"(?:不是|不想|不要|不用|没有|无需|不需要|不必|并非)(?!逼|让)[^，。,.!?！？逼让\s]{0,3}$"
)
_EN_COMPLAINT_NEGATED = re.compile(
    r"(?:\bnot|n't|\bnever)\s+(?:(?:want|wanna|need|going|trying|planning|asking)\s+(?:to\s+|for\s+)?)?"
    r"(?:(?!believe|understand|imagine|make|stop)\w+\s+)?$|\bno\s+need\s+(?:to|for)\s+(?:\w+\s+)?$",
    re.IGNORECASE,
)
# ...and "why" before it, or "…是什么" after it, make a negation a charge ("why can't I talk to a
# manager?", "你们不是骗子是什么").
_WHY = re.compile(r"\bwhy\b|为什么|凭什么", re.IGNORECASE)
_ZH_RHETORICAL = re.compile(r"^[^，。,.!?！？]{0,4}是什么")


# Rule 4: what happened to the customer, told as a fact (past or present), not asked about. Harm to
# a person or a thing on fire; an account used by someone else; orders or charges not made.
# Between "used it" and the harm, no hedge or denial (用了会不会过敏, 用了没有过敏).
_ZH_GAP = r"(?:(?!会|容易|没|不|是否|能不能|可能|怕|担心)[^，。,.!?！？]){0,8}"
_ZH_INCIDENT = re.compile(
    r"(?:用了|吃了|戴了|穿了|抹了|擦了|涂了|喝了)" + _ZH_GAP + r"(?:过敏|起疹|红肿|发炎|中毒|拉肚子)"
    r"|过敏了|起(?:了)?(?:红)?疹子|(?:脸|手|脚|嘴|眼睛|皮肤|全身)(?:都|全)?(?:肿了|烂了|红肿|过敏了)"
    # A person hurt (not a parcel: 包裹被划伤了, 屏幕被砸到了), and not a product (烫伤膏, 防烫伤).
    r"|(?:烫伤|烧伤|割伤|扎伤|电伤|受伤)了|(?:手|脚|脸|嘴|胳膊|腿|孩子|宝宝|我)被[^，。,.!?！？]{0,4}(?:烫|烧|割|划|扎|电)(?:伤|到)"
    # Fire and the like as an event (了), not a product's name or spec (爆炸款, 漏电保护器, 冒烟测试).
    r"|(?:着火|起火|冒烟|冒火花|爆炸|自燃|漏电|触电)(?:了|咗)"
    # Held-out set 7: a thing that burst, scalding water on a hand, a child who swallowed a part
    # (Cantonese 咗 as 了). Being in hospital alone is not one (我住院了，能晚点收货吗).
    r"|(?:杯|瓶|壶|锅|电池|充电宝)(?:子)?(?:突然|直接|居然)?(?:爆|炸)(?:了|咗|开了)"
    r"|(?:热水|开水)[^，。,.!?！？]{0,4}(?:淋|烫|泼)(?:到|在|伤)(?:了)?(?:我|手|脚|脸|孩子|小孩|宝宝)"
    # Swallowed: a part, not a sweet (软糖一口就吞了).
    r"|(?:零件|电池|纽扣|扣子|磁铁|珠子|小球|配件|螺丝|硬币|小东西)[^，。,.!?！？]{0,6}(?:吞|咽)(?:下去|进去|下)?了|误食了"
    r"|(?:账号|账户|帐号|帐户|号|支付宝|微信)(?:被|让人|给人)(?:盗|黑|偷)|被盗号|盗号了|被盗刷|盗刷了"
    r"|(?:账号|账户|帐号|帐户)(?:被|让|给)(?:人|别人|陌生人)(?:登|登录|登陆|改)了?|手机号(?:都|也)?被(?:人)?改了"
    # Defrauded: money sent to someone posing as the shop (被骗了, 我已经转了3000).
    r"|被骗(?:了|走|去)?[^，。,.!?！？]{0,6}(?:\d+|钱)|(?:让我|叫我)转账[^。.!?！？]{0,24}(?:已经|我)(?:已经)?转(?:了|过去|出去)"
    # In crisis: a person, not a bot (活着好累, 不想活了; not 自杀式降价, 想死你们了).
    r"|活着(?:好|真|太)?累|不想活了|轻生|自杀(?!式)"
    r"|(?:别人|陌生人|有人)(?:登录|登陆|盗用|冒用)了?我的(?:账号|账户|帐号|号|卡)"
    r"|有人用我的(?:账号|账户|帐号|号|卡|余额)"
    # Orders the customer did not place (not 这件衣服不是我买的，是朋友送的).
    r"|(?:这(?:个|笔)?)?(?:订单|单)不是我(?:本人)?(?:下|买|付)的|不是我(?:本人)?下的(?:单|订单)"
    r"|我(?:根本)?没(?:有)?下过(?:这(?:个|笔)?)?(?:单|订单)"
    r"|(?:威胁|骚扰|辱骂|殴打|推搡)(?:了)?我|(?:对我|冲我)(?:动手|骂)"
    # Held-out set 9: a child that nearly swallowed a part; a courier who swore at the customer and
    # said he knows where they live; a customer at the end of their tether; card details typed
    # into a link from a fake sender. Narrow on purpose (a review's look-alikes): 快递员打我电话 (打 is
    # "to phone"), 不敢出门 because of rain, 差点呛到 laughing, 穷得活不下去了, the shop's own reset link.
    r"|(?:孩子|宝宝|小孩|儿子|女儿|娃|幼儿)[^，。,.!?！？]{0,12}差(?:一)?点(?:就)?(?:把[^，。,.!?！？]{0,6})?(?:吞|咽|误食)"
    r"|(?:零件|电池|纽扣|扣子|磁铁|珠子|小球|配件|螺丝)[^，。,.!?！？]{0,8}差(?:一)?点(?:就)?(?:被)?(?:吞|咽|误食)"
    r"|知道我(?:家)?住(?:哪|在哪|哪里|哪儿)(?=[^。.!?！？]{0,30}(?:不敢|害怕|好怕|吓))"
    r"|(?:骂|威胁|吓唬)[^。.!?！？]{0,20}知道我(?:家)?住(?:哪|在哪|哪里|哪儿)"
    r"|(?:快递员|快递小哥|配送员|骑手|司机|送货的)[^，。,.!?！？]{0,10}(?:骂|威胁|骚扰)(?:了)?我"
    r"|我(?:真的|实在|快|已经)?撑不下去了?(?![^，。,.!?！？]{0,4}(?:电|用))"
    r"|(?:短信|陌生|假|冒充|钓鱼|诈骗)[^。.!?！？]{0,30}链接[^。.!?！？]{0,20}(?:输入|填|输)(?:了)?(?:我的)?(?:卡号|密码|验证码|银行卡)"
    r"|链接[^。.!?！？]{0,20}(?:输入|填|输)(?:了)?(?:我的)?(?:卡号|密码|验证码|银行卡)[^。.!?！？]{0,20}(?:钱没了|钱被|被扣|扣了|被盗|被转走)"
)
_EN_BODY = (
    r"(?:hands?|fingers?|face|skin|arms?|legs?|foot|feet|mouth|eyes?|lips?|back|neck|head|kid|son|daughter"
    r"|child|baby|wife|husband)"
)
_EN_INCIDENT = re.compile(
    _WORD + r"(?:"
    r"(?:had|have|having|got|gave\s+(?:me|him|her|them|us|my\s+\w+)|caused|suffered)\s+(?:an?\s+)?"
    r"(?:bad\s+|severe\s+|serious\s+)?(?:allergic\s+)?(?:rash(?!\s*guard)|reaction|hives|blisters)"
    r"|broke\s+out\s+in\s+(?:an?\s+)?(?:\w+\s+)?(?:rash|hives|blisters)"
    r"|(?:burned|burnt|cut|injured|hurt|shocked|electrocuted)\s+(?:myself|herself|himself|themselves"
    r"|(?:my|his|her|their|our)\s+" + _EN_BODY + r")"
    r"|(?:burned|burnt|injured|electrocuted)\s+(?:me|him|her|them|us)\b"
    r"|(?:caught|went\s+up\s+in)\s+(?:on\s+)?(?:fire|flames)|(?:started|began|kept)\s+(?:smoking|sparking)"
    r"|(?:battery|charger|cable|plug|adapter|device|phone|bottle|kettle|heater|lamp|toy|power\s+bank)\s+"
    r"(?:literally\s+|just\s+)?(?:exploded|blew\s+up|melted|caught\s+fire)|electric(?:al)?\s+shock"
    r"|(?:my|our)\s+account\s+(?:was|got|is|has\s+been|'s\s+been)\s+(?:hacked|compromised|taken\s+over|stolen)"
    r"|(?:hacked|broke\s+into|got\s+into|logged\s+into)\s+my\s+account"
    r"|some\s*(?:one|body)\s+(?:hacked|is\s+using|used|accessed)\s+my\s+(?:account|card)"
    r"|unauthori[sz]ed\s+(?:orders?|charges?|purchases?|payments?|transactions?)"
    r"|(?:orders?|charges?|purchases?)\s+(?:\w+\s+){0,4}?(?:that\s+)?i\s+(?:didn'?t|did\s+not|never)\s+"
    r"(?:place|placed|make|made|order|ordered|authori[sz]ed?)"
    r"|i\s+(?:didn'?t|did\s+not|never)\s+(?:place|placed|make|made|authori[sz]ed?)\s+(?:this|these|that|those|any)\s+"
    r"(?:orders?|charges?|purchases?|payments?)"
    r"|(?:don'?t|do\s+not)\s+recogni[sz]e\s+(?:these|this|that|those|the|any)\s+(?:charges?|orders?|transactions?|payments?)"
    r"|(?:threatened|harassed|assaulted|attacked|abused|shoved)\s+(?:me|my\s+(?:wife|husband|kid|son|daughter|mom|dad|mother|father))"
    # Held-out set 7: defrauded (card details given to a fake "support"), bereaved, in crisis.
    r"|i\s+(?:was|have\s+been|'ve\s+been|’ve\s+been)\s+(?:scammed|phished|defrauded|conned)"
    r"|(?:card|bank|account|login)\s+(?:details|number|info|information|password)[^.!?]{0,40}\bi\s+(?:gave|sent|shared)\s+(?:them|it|him|her)\b"
    r"|(?:my|our)\s+(?:(?:dear|beloved|late)\s+)?(?:husband|wife|partner|mum|mom|mother|dad|father|son|daughter|child|kid|baby"
    r"|brother|sister|grand(?:ma|mother|pa|father)|aunt|uncle|friend)\s+(?:has\s+|just\s+|recently\s+)?(?:passed\s+away|died)"
    r"|(?:my|our|his|her)\s+(?:\w+['’]s\s+)?funeral"
    r"|i(?:['’]?m|\s+am)\s+(?:in\s+)?(?:in\s+)?a\s+(?:really\s+|very\s+)?(?:bad|dark)\s+place"
    r"|\bi\s+(?:just\s+)?(?:want|wanna)\s+to\s+(?:die|kill\s+myself|end\s+it\s+all)"
    r"|kill\s+myself|suicidal|end\s+my\s+life|don'?t\s+want\s+to\s+(?:live|be\s+alive)"
    # Held-out set 9 (as the Chinese ones above, and as narrow: "almost choked on the chips",
    # "I can't cope with how cute this is", "everything is falling apart after one wash").
    r"|(?:nearly|almost)\s+(?:swallowed|choked\s+on)\s+(?:an?\s+|the\s+|one\s+of\s+the\s+|some\s+)?"
    r"(?:small\s+|tiny\s+|loose\s+)?(?:parts?|pieces?|batter(?:y|ies)|magnets?|beads?|screws?|buttons?)"
    r"|my\s+life\s+is\s+falling\s+apart|at\s+the\s+end\s+of\s+my\s+rope"
    r"|i\s+(?:just\s+)?can(?:['’]?t|not)\s+(?:go\s+on|cope)(?:\s+any\s*more)?(?=\s*(?:[.,!?;]|$|and\b|but\b))"
    r"|(?:(?:don['’]?t|do\s+not)\s+know|idk)\s+what\s+to\s+do\s+any\s*more(?=\s*(?:[.,!?;]|$|and\b|but\b))"
    r"|(?:clicked|tapped|opened)\s+(?:on\s+)?(?:it|the\s+link|a\s+link|that\s+link)[^.!?]{0,60}"
    r"(?:entered|typed|gave|put\s+in)\s+(?:in\s+)?my\s+(?:card|bank|credit\s+card|debit\s+card)[^.!?]{0,60}"
    r"(?:charges?|charged|money\s+(?:is\s+|was\s+)?(?:gone|taken|stolen)|drained|emptied)"
    r")" + _END,
    re.IGNORECASE,
)
# ...told as a fact, not feared, asked about or denied: 电池会不会爆炸, 怎么防止账号被盗, 没有过敏,
# "what if my account was hacked", "how do I stop someone hacking my account", "no allergic reaction".
_ZH_INCIDENT_NOT = re.compile(
    r"(?:会不会|会|是否|能不能|可能|容易|防止?|避免|怕|担心|万一|如果|不会|没有|没|未|不)$"
)
_EN_INCIDENT_NOT = re.compile(
    r"(?:\b(?:if|in\s+case|prevent|avoid|protect|could|might|would|will|can|no|not|never|worried|afraid|risk)\b"
    r"|(?<!can)n't\b(?!\s+believe)|can['’]?t(?!\s+believe))[^.!?]{0,24}$"
    # ...or a yes/no question about it ("Does this cream cause an allergic reaction?").
    r"|(?:^|[.!?]\s*)(?:does|do|did|has|have|is|are)\b[^.!?]*$",
    re.IGNORECASE,
)


def incident_marker(text: str) -> str | None:
    """The words in `text` that tell of something only a person can take on (rule 4), or None."""
    folded = fold_for_rules(text)
    for pattern, told_otherwise in ((_ZH_INCIDENT, _ZH_INCIDENT_NOT), (_EN_INCIDENT, _EN_INCIDENT_NOT)):
        for match in pattern.finditer(folded):
            before = folded[max(0, match.start() - 30) : match.start()]
            if not told_otherwise.search(before.rstrip() if pattern is _ZH_INCIDENT else before):
                return match.group(0)
    return None


def complaint_marker(text: str) -> str | None:
    """The words in `text` that show an angry or escalating customer (rule 3), or None."""
    folded = fold_for_rules(text)
    for pattern, negated in ((_ZH_COMPLAINT, _ZH_COMPLAINT_NEGATED), (_EN_COMPLAINT, _EN_COMPLAINT_NEGATED)):
        for match in pattern.finditer(folded):
            before = folded[max(0, match.start() - 30) : match.start()]
            if not negated.search(before) or _WHY.search(before) or _ZH_RHETORICAL.match(folded, match.end()):
                return match.group(0)
    return None


@dataclass(frozen=True, slots=True)
class IntentDecision:
    label: str
    confidence: float


@dataclass(frozen=True, slots=True)
class HandoffHistory:
    """Consecutive unresolved turns before this one (low confidence or unanswered)."""

    consecutive_unresolved: int = 0


@dataclass(frozen=True)
class TenantHandoffRules:
    always_handoff_intents: frozenset[str] = frozenset()
    # Extra words or phrases that hand off when they appear in a message (case-insensitive).
    keywords: Sequence[str] = ()
    low_confidence_threshold: float = 0.5
    max_unresolved_turns: int = 2
    # Intent → queue, on top of DEFAULT_QUEUES.
    queues: Mapping[str, str] = field(default_factory=dict)
    default_queue: str = DEFAULT_QUEUE

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TenantHandoffRules:
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"tenant handoff rules: unknown keys {unknown}; allowed: {sorted(allowed)}")
        values = dict(data)
        if "always_handoff_intents" in values:
            values["always_handoff_intents"] = frozenset(values["always_handoff_intents"])
        if "keywords" in values:
            values["keywords"] = tuple(values["keywords"])
        return cls(**values)

    def queue_for(self, intent: IntentDecision) -> str:
        if intent.confidence < self.low_confidence_threshold:
            return self.default_queue
        return self.queues.get(intent.label) or DEFAULT_QUEUES.get(intent.label) or self.default_queue


DEFAULT_RULES = TenantHandoffRules()


@dataclass(frozen=True, slots=True)
class Handoff:
    reason: str
    queue: str
    # What fired, for the log and for agents: the keyword, the intent or the counter.
    detail: str = ""


# The needs-person probe reads what a message is about (people, agents, escalation), not its
# negation: 不要转给别人 and "I don't want to speak to a manager" score 0.9+. So it does not hand off
# a message with a negation shortly before a word for a person or for passing the conversation on
# (a wider net than `declines_human`, which the rules use: for the probe a missed hand-off is the
# cheaper error, since the rules still fire on an explicit request).
_ZH_NEGATED_PERSON = re.compile(
    r"(?:不|别|没必要|无需|算了|免了)[^，。,.!?！？]{0,6}"
    r"(?:人工|真人|同事|别人|其他人|客服|经理|主管|领导|跟人|找人|转给|转接|麻烦)"
)
_ZH_A_NOT_A = re.compile(r"(.)[不没]\1")
_EN_NEGATED_PERSON = re.compile(
    r"\b(?:don['’]?t|do\s+not|doesn['’]?t|no|not|never|without|rather\s+than|instead\s+of|forget|won['’]?t)\b"
    r"(?:\W+\w+){0,5}?\W+"
    r"(?:human|person|agent|manager|supervisor|(?:some|any)\s*(?:one|body)\s+else|colleague|staff|rep"
    r"|representative|escalat\w*|hand\s+(?:me|this|it)\s+over|transfer\w*|pass\s+(?:me|this|it)\s+on)\b",
    re.IGNORECASE,
)


def negates_a_person(text: str) -> bool:
    """A negation shortly before a person or a hand-over: the probe's hand-off is not trusted."""
    # An A-not-A question (能不能, 可不可以, 要不要) asks; it does not refuse.
    folded = _ZH_A_NOT_A.sub("", fold_for_rules(text))
    return bool(_ZH_NEGATED_PERSON.search(folded) or _EN_NEGATED_PERSON.search(text))


def _requests(text: str) -> tuple[list[tuple[str, bool]], bool]:
    """Each phrase in `text` asking for a person, with whether it is refused; and whether the text
    refuses a person anywhere (also without a request phrase: "I don't need a human")."""
    requests: list[tuple[str, bool]] = []
    refused_anywhere = False
    for match in _ZH_REQUEST.finditer(text):
        refused = bool(
            _ZH_REFUSED_BEFORE.search(text[max(0, match.start() - 8) : match.start()])
            or _ZH_REFUSED_AFTER.match(text, match.end())
        )
        refused_anywhere |= refused
        requests.append((match.group(0), refused))
    refusals = [
        m.span() for m in _EN_REFUSAL.finditer(text) if not _EN_NOT_A_REFUSAL_AFTER.search(text[: m.start()])
    ]
    refused_anywhere |= bool(refusals)
    for match in _EN_REQUEST.finditer(text):
        refused = any(start <= match.start() < end for start, end in refusals)
        requests.append((match.group(0).strip(), refused))
    return requests, refused_anywhere


# Asking about the people rather than for one: when they work, how to call or write to them
# (人工客服几点下班, 客服电话多少, "what time do agents come online", "support email"). The intent model
# reads these as talk_to_human (人工客服几点下班: 0.94); the FAQ's contact article answers them.
_ZH_ABOUT_SUPPORT = re.compile(
    r"(?:人工|客服|真人)(?:客服)?(?:的)?(?:几点|什么时候|哪天|时间|上班|下班|工作时间|服务时间|在线时间|营业时间"
    r"|周末|电话|热线|号码|邮箱|联系方式)"
)
_EN_SUPPORT = (
    r"(?:agents?|humans?|people|staff|support(?:\s+team)?|customer\s+(?:service|support)|live\s+chat|reps?)"
)
_EN_ABOUT_SUPPORT = re.compile(
    rf"\b(?:what|which)\s+(?:time|times|hours?|days?)\b[^.?!]{{0,40}}\b{_EN_SUPPORT}\b"
    rf"|\bwhen\s+(?:are|is|do|does)\s+(?:your\s+|the\s+)?{_EN_SUPPORT}\b[^.?!]{{0,30}}\b(?:open|online|available|on|around|work)\b"
    rf"|\b{_EN_SUPPORT}(?:['’]s)?\s+(?:hours|opening\s+hours|phone(?:\s+number)?|number|e-?mail(?:\s+address)?)\b"
    rf"|\b(?:(?:an?|the|your)\s+|what\s+are\s+(?:the\s+|your\s+)?|what(?:['’]s|s|\s+is)\s+(?:the\s+|your\s+)?)"
    rf"(?:opening\s+|business\s+|working\s+)?(?:hours|phone\s+number|e-?mail(?:\s+address)?)\s+(?:of|for)\s+"
    rf"(?:your\s+|the\s+)?{_EN_SUPPORT}\b",
    re.IGNORECASE,
)


# ...and nothing more: a message that goes on to want something done by a person (帮我转一下, 我的退款
# 要人处理, 我等了两天, "this needs a human decision") is a request whatever else it asks (a review's
# examples, twenty-ninth session).
_ZH_WANTS_A_PERSON = re.compile(r"转|处理|帮我|等了|回复我|联系我|找人|要人")
_EN_WANTS_A_PERSON = re.compile(
    r"\b(?:need|want|waiting|waited|escalat\w*|decision|some\s*(?:one|body)|help\s+me|transfer|connect|call\s+me)\b",
    re.IGNORECASE,
)


def asks_about_support(text: str) -> bool:
    """Does `text` ask when the people work or how to reach them, and nothing more (a question
    for the FAQ)?"""
    folded = fold_for_rules(text)
    if _ZH_WANTS_A_PERSON.search(folded) or _EN_WANTS_A_PERSON.search(text):
        return False
    return bool(_ZH_ABOUT_SUPPORT.search(folded) or _EN_ABOUT_SUPPORT.search(text))


def asks_for_human(text: str) -> str | None:
    """The phrase in `text` asking for a person, or None (refused persons do not count)."""
    return next((phrase for phrase, refused in _requests(text)[0] if not refused), None)


def declines_human(text: str) -> bool:
    """Does `text` refuse a person ("不要转人工", "I don't want to talk to a human", "no need for a
    person") and nowhere ask for one? The intent model reads the words, not the negation."""
    requests, refused_anywhere = _requests(text)
    return refused_anywhere and all(refused for _, refused in requests)


def is_unresolved(
    intent: IntentDecision, answered: bool | None, rules: TenantHandoffRules = DEFAULT_RULES
) -> bool:
    """Did the bot struggle with this turn? `answered` None means retrieval has not run (no verdict).

    A turn the knowledge base answered is resolved whatever the intent model thought: a tenant's
    FAQ may cover questions outside the shop taxonomy the model was trained on (travel, telecom…),
    and those come out as low-confidence `out_of_scope`."""
    if answered:
        return False
    if intent.confidence < rules.low_confidence_threshold:
        return True
    return answered is False and intent.label not in SMALL_TALK_INTENTS


def record_turn(
    history: HandoffHistory,
    intent: IntentDecision,
    answered: bool | None,
    rules: TenantHandoffRules = DEFAULT_RULES,
) -> HandoffHistory:
    """The counters after this turn: unresolved turns add one, a resolved turn resets them."""
    if is_unresolved(intent, answered, rules):
        return HandoffHistory(history.consecutive_unresolved + 1)
    return HandoffHistory(0)


def decide_handoff(
    *,
    text: str,
    intent: IntentDecision,
    answered: bool | None,
    history: HandoffHistory = HandoffHistory(),
    rules: TenantHandoffRules = DEFAULT_RULES,
    needs_person: str | None = None,
) -> Handoff | None:
    """Hand off this turn, or None to let the bot answer.

    `answered`: whether retrieval found something relevant to answer with (None if not known yet;
    call again once it is). `history` counts the turns *before* this one. `needs_person`: what the
    needs-person probe said when it found the message needs a person (None: it did not, or it was
    not run).
    """
    queue = rules.queue_for(intent)
    confident = intent.confidence >= rules.low_confidence_threshold

    phrase = asks_for_human(text)
    if phrase is not None:
        return Handoff(REASON_CUSTOMER_REQUEST, queue, f"keyword {phrase!r}")
    # The intent alone is not trusted for a question about the people that the FAQ answers.
    if (
        intent.label == TALK_TO_HUMAN
        and confident
        and not declines_human(text)
        and not (answered and asks_about_support(text))
    ):
        return Handoff(REASON_CUSTOMER_REQUEST, queue, f"intent {TALK_TO_HUMAN}")

    if intent.label in rules.always_handoff_intents and confident:
        return Handoff(REASON_TENANT_RULE, queue, f"intent {intent.label}")
    lowered = text.casefold()
    for keyword in rules.keywords:
        if keyword and keyword.casefold() in lowered:
            return Handoff(REASON_TENANT_RULE, queue, f"keyword {keyword!r}")

    if intent.label == COMPLAINT and confident:
        return Handoff(REASON_COMPLAINT, queue, f"intent {COMPLAINT}")
    marker = complaint_marker(text)
    if marker is not None:
        # A confident intent routes as usual (an angry refund is billing's); an unsure one is
        # not trusted, and the complaint is the one thing known.
        complaints = rules.queue_for(IntentDecision(COMPLAINT, 1.0))
        return Handoff(REASON_COMPLAINT, queue if confident else complaints, f"keyword {marker!r}")

    incident = incident_marker(text)
    if incident is not None:
        return Handoff(REASON_INCIDENT, queue, f"keyword {incident!r}")

    if needs_person is not None and not answered and not declines_human(text) and not negates_a_person(text):
        return Handoff(REASON_NEEDS_PERSON, queue, needs_person)

    if is_unresolved(intent, answered, rules):
        turns = history.consecutive_unresolved + 1
        if turns >= rules.max_unresolved_turns:
            reason = REASON_LOW_CONFIDENCE if not confident else REASON_UNANSWERED
            return Handoff(reason, queue, f"{turns} unresolved turns in a row")
    return None
